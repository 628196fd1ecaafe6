"""wireguard: pod traffic between nodes encrypted in a WireGuard device (Flannel's wireguard backend).

One device per node (default `weft-wg`), the kernel's where the module exists, wireguard-go's
elsewhere. Each peer node is one WireGuard peer: its public key from its lease, AllowedIPs its pod
subnet, endpoint its public IP and ListenPort. The whole cluster network is routed into the device,
so traffic for a subnet without a (trusted) peer is dropped there rather than sent in clear.
Peers are reconciled like routes: at start, on every store change, every resync.
"""

from __future__ import annotations

import argparse
import base64
import errno
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import netaddr
from pyroute2 import IPRoute

from weftd.backend import Backend, BackendError, RouteSpec, Stats, Underlay, register, sync_routes
from weftd.backend.wireguard.config import WireGuardConfig
from weftd.backend.wireguard.device import Device, NotSupported, valid_ifname
from weftd.backend.wireguard.keys import KEY_FILE, KeyPair, load_or_create
from weftd.backend.wireguard.peers import Desired, PeerConfig, RemovePeer, SetPeer, desired_peers, plan
from weftd.config import ConfigError, Env, NetworkConfig
from weftd.lease import Attrs, Lease
from weftlib.kernel.netlink import ignore_errno, kind

log = logging.getLogger("weftd.wireguard")
# Outer IP header + UDP 8 + WireGuard data header 16 + authentication tag 16.
OVERHEAD = {4: 20 + 8 + 16 + 16, 6: 40 + 8 + 16 + 16}
DEFAULT_DEVICE = "weft-wg"
IMPLEMENTATIONS = ("auto", "kernel", "userspace")


def open_device(ipr: IPRoute, ifname: str, implementation: str = "auto") -> Device:
    """The kernel's device where the module exists (or `implementation` says so), else wireguard-go's.
    A wireguard-go device left by an earlier weftd is kept."""
    from weftd.backend.wireguard.kernel import Kernel
    from weftd.backend.wireguard.userspace import Userspace

    if not valid_ifname(ifname):
        raise BackendError(f"WireGuard device name {ifname!r} is not a valid interface name (1-15 bytes)")
    if implementation not in IMPLEMENTATIONS:
        raise BackendError(f"WireGuard implementation {implementation!r} must be one of {IMPLEMENTATIONS}")
    existing = Kernel(ifname).link(ipr)
    existing_kind = kind(existing) if existing is not None else None
    if implementation == "kernel" or (implementation == "auto" and existing_kind != "tun"):
        dev = Kernel(ifname)
        try:
            dev.ensure(ipr)
            dev.state()
            return dev
        except NotSupported as e:
            dev.close()
            if implementation == "kernel":
                raise BackendError(f"kernel WireGuard was asked for, but {e}") from None
            log.info("%s; using %s in userspace", e, "wireguard-go")
    user = Userspace(ifname)
    user.available()
    return user


def remove_device(ipr: IPRoute, ifname: str) -> None:
    """Uninstall: stops a wireguard-go serving `ifname` here and deletes the device if it is Weft's."""
    from weftd.backend.wireguard.kernel import Kernel
    from weftd.backend.wireguard.userspace import Userspace

    Userspace(ifname).remove(ipr)
    Kernel(ifname).remove(ipr)


def load_keys(state_dir: Path) -> KeyPair:
    path = state_dir / KEY_FILE
    keys, created = load_or_create(path)
    if created:
        log.info("generated a WireGuard key pair: private key in %s (mode 0600), public key %s", path,
                 keys.public_b64)
    else:
        log.info("WireGuard private key from %s, public key %s", path, keys.public_b64)
    return keys


@register
class WireGuard(Backend[WireGuardConfig]):
    type = "wireguard"
    config_type = WireGuardConfig

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, env: Env) -> None:
        parser.add_argument("--state-dir", default=env("state-dir", "/var/lib/weft"),
                            help="weftd's persistent state (the WireGuard key); not a tmpfs, so it survives reboots")
        parser.add_argument("--wireguard-device", default=env("wireguard-device", DEFAULT_DEVICE),
                            help="wireguard backend: the device name; unique on the host (wireguard-go's control "
                                 "sockets are shared by all network namespaces)")
        parser.add_argument("--wireguard-implementation", choices=IMPLEMENTATIONS,
                            default=env("wireguard-implementation", "auto"),
                            help="wireguard backend: the kernel module where it exists (auto), or wireguard-go")

    @classmethod
    def create(cls, ipr: IPRoute, network: NetworkConfig, underlay: Underlay, published: Attrs | None,
               args: argparse.Namespace) -> WireGuard:
        keys = load_keys(Path(args.state_dir))
        device = open_device(ipr, args.wireguard_device, args.wireguard_implementation)
        log.info("WireGuard device %s: %s", args.wireguard_device, device.implementation)
        cfg = network.backend
        assert isinstance(cfg, WireGuardConfig)
        if network.network is None or network.ipv6 is not None:
            raise ConfigError("the wireguard backend carries IPv4 only so far: it needs EnableIPv4 and no EnableIPv6")
        return cls(ipr, cfg, underlay, device=device, keys=keys, network=network.network)

    @classmethod
    def teardown(cls, ipr: IPRoute, args: argparse.Namespace) -> None:
        super().teardown(ipr, args)
        remove_device(ipr, args.wireguard_device)

    def __init__(self, ipr: IPRoute, cfg: WireGuardConfig, underlay: Underlay, *, device: Device,
                 keys: KeyPair, network: netaddr.IPNetwork) -> None:
        super().__init__(ipr, cfg, underlay)
        self.wg = cfg
        self.device = device
        self.keys = keys
        self.private_b64 = base64.b64encode(keys.private).decode()
        self.network = network
        self.index = -1
        self._lock = threading.Lock()  # the reconciliation and the restorer after a wireguard-go restart
        self._own: Lease | None = None
        self._peers: list[Lease] = []
        self._refused: dict[str, str] = {}
        self._nodes: dict[str, str] = {}
        self.restored = 0
        device.on_restart = self._restore

    def attrs(self) -> Attrs:
        return Attrs(self.underlay.ip, self.type, public_key=self.keys.public_b64, wg_port=self.wg.listen_port)

    def mtu(self) -> int:
        return (self.cfg.mtu or self.underlay.mtu) - OVERHEAD[4 if self.underlay.ip is not None else 6]

    def setup(self, own: Lease) -> None:
        with self._lock:
            self._own = own
            self._setup(self.ipr, own)

    def _setup(self, ipr: IPRoute, own: Lease) -> None:
        if self.device.ensure(ipr):
            log.info("created %s (%s, port %d, MTU %d)", self.device.ifname, self.device.implementation,
                     self.wg.listen_port, self.mtu())
        link = self.device.link(ipr)
        if link is None:
            raise BackendError(f"{self.device.ifname} vanished while being set up")
        self.index = link["index"]
        state = self.device.state()
        key = self.private_b64 if state.private_key != self.private_b64 else None
        port = self.wg.listen_port if state.listen_port != self.wg.listen_port else None
        if key is not None or port is not None:
            self.device.set(private_key=key, listen_port=port)
            if key is not None:
                log.info("%s: private key set (public key %s)", self.device.ifname, self.keys.public_b64)
        if link.get("IFLA_MTU") != self.mtu():
            ipr.link("set", index=self.index, mtu=self.mtu())
        if not link["flags"] & 1:  # IFF_UP
            ipr.link("set", index=self.index, state="up")
        # The subnet's network address as /32: the source of host-to-pod traffic, within the
        # AllowedIPs peers have for this node.
        assert own.subnet is not None  # create() refuses IPv6
        want = str(own.subnet.network)
        family = socket.AF_INET if own.subnet.version == 4 else socket.AF_INET6
        plen = 32 if family == socket.AF_INET else 128
        for a in ipr.get_addr(family=family, index=self.index):
            if a.get("IFA_ADDRESS") != want or a["prefixlen"] != plen:
                ignore_errno(ipr.addr, "del", index=self.index, address=a.get("IFA_ADDRESS"),
                             prefixlen=a["prefixlen"], codes=(errno.EADDRNOTAVAIL,))
        ignore_errno(ipr.addr, "add", index=self.index, address=want, prefixlen=plen, codes=(errno.EEXIST,))

    def reconcile(self, own: Lease, peers: list[Lease]) -> Stats:
        with self._lock:
            self._own, self._peers = own, list(peers)
            self._setup(self.ipr, own)  # a deleted device or a lost key or port comes back first
            return self._apply(self.ipr, own, peers)

    def _apply(self, ipr: IPRoute, own: Lease, peers: list[Lease]) -> Stats:
        stats = Stats(peers=len(peers))
        desired = desired_peers(own, self.keys.public_b64, peers, self.wg.listen_port, self.wg.keepalive,
                                self.wg.psk)
        self._report(desired)
        actual = self.device.state().peers
        ops = plan(desired.peers, actual)
        if ops:
            self.device.set(ops=ops)
            for op in ops:
                if isinstance(op, RemovePeer):
                    node = self._nodes.get(op.public_key, "unknown to the store")
                    log.info("%s: removed peer %s (%s)", self.device.ifname, node, op.public_key)
                else:
                    assert isinstance(op, SetPeer)
                    self._log_set(op.peer, desired.nodes[op.peer.public_key], actual.get(op.peer.public_key))
            stats.changes += len(ops)
        self._nodes = dict(desired.nodes)
        stats.unreachable = sorted(desired.refused)
        sync_routes({self.network: RouteSpec(None, self.index)}, stats)
        return stats

    def _log_set(self, peer: PeerConfig, node: str, had: Any) -> None:
        if had is None:
            log.info("%s: added peer %s (%s) at %s, allowed IPs %s", self.device.ifname, node, peer.public_key,
                     peer.endpoint, ",".join(peer.allowed_ips))
            return
        what = [f"{name} {getattr(had.config, attr)} -> {getattr(peer, attr)}"
                for name, attr in (("endpoint", "endpoint"), ("allowed IPs", "allowed_ips"),
                                   ("keepalive", "keepalive")) if getattr(had.config, attr) != getattr(peer, attr)]
        if had.config.psk != peer.psk:
            what.append("preshared key")
        log.info("%s: fixed peer %s (%s): %s", self.device.ifname, node, peer.public_key, "; ".join(what))

    def _report(self, desired: Desired) -> None:
        """Refusals are logged when they change, not every round."""
        if desired.refused == self._refused:
            return
        for node, why in sorted(desired.refused.items()):
            if self._refused.get(node) != why:
                log.error("wireguard: not programming peer %s: %s", node, why)
        for node in self._refused.keys() - desired.refused.keys():
            log.info("wireguard: peer %s is no longer refused", node)
        self._refused = dict(desired.refused)

    def _restore(self) -> None:
        """After wireguard-go came back empty: key, port, address, MTU, peers and route again."""
        with self._lock:
            if self._own is None:
                return
            t = time.perf_counter()
            with IPRoute() as ipr:  # this runs in the supervisor's thread: a socket of its own
                self._setup(ipr, self._own)
                self._apply(ipr, self._own, self._peers)
            self.restored += 1
            log.info("%s restored: %d peers configured in %.3fs", self.device.ifname, len(self._nodes),
                     time.perf_counter() - t)

    def info(self) -> dict[str, str]:
        return {"wireguard": f"{self.device.describe()}, device {self.device.ifname}, port {self.wg.listen_port}, "
                             f"public key {self.keys.public_b64}"}

    def observe(self, metrics: Any) -> None:
        metrics.wireguard_implementation.labels(self.device.implementation, self.device.ifname).set(1)
        metrics.wireguard_peers.set(len(self._nodes))
        metrics.wireguard_restarts.set(getattr(self.device, "restarts", 0))

    def close(self) -> None:
        self.device.close()
