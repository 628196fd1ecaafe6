"""The kernel's WireGuard device: an rtnetlink link of kind wireguard, configured over the
"wireguard" generic netlink family with messages built here and sent through pyroute2's WireGuard
socket. The message builders are separate from the socket so they can be checked without the
module."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)

from weftd.backend.errors import BackendError
from weftd.backend.wireguard.device import Device, NotSupported
from weftd.backend.wireguard.peers import ZERO_KEY, DeviceState, PeerConfig, PeerOp, PeerState, RemovePeer, SetPeer
from weftlib.kernel.netlink import GROUP, kind, owned

PEERS_PER_MESSAGE = 16  # keeps each request well under a page, as wg(8) does


def _split_endpoint(ep: str) -> tuple[str, int]:
    host, _, port = ep.rpartition(":")
    return host.strip("[]"), int(port)


def _allowed_ip(cidr: str) -> dict[str, Any]:
    addr, _, plen = cidr.partition("/")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family], ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(family, addr)],
                      ["WGALLOWEDIP_A_CIDR_MASK", int(plen)]]}


def _peer_attrs(op: PeerOp) -> dict[str, Any]:
    if isinstance(op, RemovePeer):
        return {"attrs": [["WGPEER_A_PUBLIC_KEY", op.public_key], ["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME]]}
    assert isinstance(op, SetPeer)
    p = op.peer
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", p.public_key],
                              ["WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS],
                              ["WGPEER_A_PRESHARED_KEY", p.psk or ZERO_KEY],
                              ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", p.keepalive]]
    if p.endpoint:
        host, port = _split_endpoint(p.endpoint)
        attrs.append(["WGPEER_A_ENDPOINT", {"addr": host, "port": port}])
    attrs.append(["WGPEER_A_ALLOWEDIPS", [_allowed_ip(c) for c in p.allowed_ips]])
    return {"attrs": attrs}


def set_messages(ifname: str, private_key: str | None = None, listen_port: int | None = None,
                 ops: list[PeerOp] | tuple[PeerOp, ...] = ()) -> list[wgmsg]:
    """WG_CMD_SET_DEVICE requests: the device's key and port in the first, peers in chunks."""
    msgs = []
    chunks = [list(ops[i:i + PEERS_PER_MESSAGE]) for i in range(0, len(ops), PEERS_PER_MESSAGE)] or [[]]
    for n, chunk in enumerate(chunks):
        msg = wgmsg()
        msg["cmd"] = WG_CMD_SET_DEVICE
        msg["version"] = WG_GENL_VERSION
        msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
        if n == 0 and private_key is not None:
            msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", private_key])
        if n == 0 and listen_port is not None:
            msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", listen_port])
        if chunk:
            msg["attrs"].append(["WGDEVICE_A_PEERS", [_peer_attrs(op) for op in chunk]])
        if len(msg["attrs"]) > 1:
            msgs.append(msg)
    return msgs


def get_message(ifname: str) -> wgmsg:
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    return msg


def _key(v: Any) -> str | None:
    if v is None:
        return None
    s = v.decode() if isinstance(v, bytes) else str(v)
    return None if s == ZERO_KEY else s


def parse_device(msgs: list[Any]) -> DeviceState:
    """The answer to WG_CMD_GET_DEVICE: the kernel splits big devices over several messages, and a
    peer's allowed IPs may continue in the next message under the same public key."""
    private: str | None = None
    port = 0
    peers: dict[str, dict[str, Any]] = {}
    for msg in msgs:
        private = _key(msg.get_attr("WGDEVICE_A_PRIVATE_KEY")) or private
        port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or port
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            key = _key(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            if key is None:
                continue
            p = peers.setdefault(key, {"ips": []})
            ep = peer.get_attr("WGPEER_A_ENDPOINT")
            if ep is not None:
                addr, eport = ep["addr"], ep["port"]
                p["endpoint"] = f"[{addr}]:{eport}" if ":" in addr else f"{addr}:{eport}"
            psk = peer.get_attr("WGPEER_A_PRESHARED_KEY")
            if psk is not None:
                p["psk"] = _key(psk)
            ka = peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
            if ka is not None:
                p["keepalive"] = ka
            hs = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            if hs is not None:
                p["handshake"] = hs["tv_sec"] + hs["tv_nsec"] / 1e9
            for k, name in (("rx", "WGPEER_A_RX_BYTES"), ("tx", "WGPEER_A_TX_BYTES")):
                if peer.get_attr(name) is not None:
                    p[k] = peer.get_attr(name)
            for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []:
                p["ips"].append(ip["addr"])
    out = {}
    for key, p in peers.items():
        cfg = PeerConfig(key, p.get("endpoint"), tuple(sorted(p["ips"])), p.get("keepalive", 0), p.get("psk"))
        out[key] = PeerState(cfg, p.get("handshake", 0.0), p.get("rx", 0), p.get("tx", 0))
    return DeviceState(private, port, out)


class Kernel(Device):
    implementation = "kernel"

    def __init__(self, ifname: str) -> None:
        super().__init__(ifname)
        self._wg: Any = None

    def _socket(self) -> Any:
        if self._wg is None:
            from pyroute2 import WireGuard

            try:
                self._wg = WireGuard()
            except NetlinkError as e:
                raise NotSupported(f"no wireguard generic netlink family: {e}") from None
        return self._wg

    def ensure(self, ipr: IPRoute) -> bool:
        link = self.link(ipr)
        self.check_owned(link)
        if link is not None:
            if kind(link) != "wireguard":
                raise BackendError(f"{self.ifname} is not a kernel WireGuard device")
            return False
        try:
            ipr.link("add", ifname=self.ifname, kind="wireguard", group=GROUP)
        except NetlinkError as e:
            if e.code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
                raise NotSupported(f"the kernel has no WireGuard module ({os.strerror(e.code)})") from None
            raise
        return True

    def _request(self, msg: wgmsg, flags: int) -> list[Any]:
        wg = self._socket()
        try:
            return list(wg.nlm_request(msg, msg_type=wg.prid, msg_flags=flags))
        except NetlinkError as e:
            raise BackendError(f"wireguard netlink on {self.ifname}: {e}") from None

    def state(self) -> DeviceState:
        return parse_device(self._request(get_message(self.ifname), NLM_F_REQUEST | NLM_F_DUMP))

    def set(self, private_key: str | None = None, listen_port: int | None = None,
            ops: list[PeerOp] | tuple[PeerOp, ...] = ()) -> None:
        for msg in set_messages(self.ifname, private_key, listen_port, ops):
            self._request(msg, NLM_F_REQUEST | NLM_F_ACK)

    def remove(self, ipr: IPRoute) -> None:
        link = self.link(ipr)
        if owned(link):
            try:
                ipr.link("del", index=link["index"])
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise

    def close(self) -> None:
        if self._wg is not None:
            self._wg.close()
            self._wg = None

