"""wireguard: pod traffic between nodes encrypted in WireGuard devices (Flannel's wireguard backend).

The devices are the kernel's where the module exists, wireguard-go's elsewhere. Which devices carry
what follows Flannel's `Mode`:
  separate (the default): IPv4 pod traffic in `--wireguard-device` (weft-wg) over the nodes' IPv4
    addresses on ListenPort, IPv6 pod traffic in `--wireguard-device-v6` (weft-wg-v6) over their IPv6
    addresses on ListenPortV6;
  ipv4, ipv6: one device on ListenPort carries both families over the nodes' IPv4 (IPv6) addresses;
  auto: one device; each peer's endpoint is picked like Flannel's selectPublicEndpoint.
Each peer node is one WireGuard peer per device: its public key (one per node) from its lease,
AllowedIPs its pod subnets of the device's families, endpoint its address and published port. Each
cluster network is routed into its family's device, so traffic for a subnet without a (trusted) peer
is dropped there rather than sent in clear. Peers are reconciled like routes: at start, on every
store change, every resync.
"""

from __future__ import annotations

import argparse
import base64
import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netaddr
from pyroute2 import IPRoute

from weftd.backend import Backend, BackendConfig, register
from weftd.backend.errors import BackendError
from weftd.backend.sync import RouteSpec, Stats, sync_routes
from weftd.backend.underlay import Underlay
from weftd.backend.wireguard.config import WireGuardConfig
from weftd.backend.wireguard.device import Device, NotSupported, valid_ifname
from weftd.backend.wireguard.keys import KEY_FILE, KeyPair, load_or_create
from weftd.backend.wireguard.peers import Desired, LeaseData, PeerConfig, RemovePeer, SetPeer, desired_peers, plan
from weftd.lease import Attrs, Lease
from weftd.option import NODE, Option, ifname, path
from weftlib.kernel.netlink import ignore_errno, kind
from weftlib.kernel.rtnl import IFA_F_NODAD

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


@dataclass
class Tunnel:
    """One device and what it carries: the pod subnets of `versions`, to endpoints of the family `mode`
    picks (ipv4, ipv6 or auto), listening on `port`."""

    device: Device
    port: int
    versions: tuple[int, ...]
    mode: str
    index: int = -1
    nodes: dict[str, str] = field(default_factory=dict)  # public key -> node, as last applied
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def ifname(self) -> str:
        return self.device.ifname


def plan_tunnels(cfg: WireGuardConfig, versions: tuple[int, ...]) -> list[tuple[int, tuple[int, ...], str]]:
    """(listen port, pod families, endpoint mode) of each device, the IPv4 one first; `versions`: the
    cluster's families."""
    if cfg.mode == "separate":
        return [(cfg.listen_port if v == 4 else cfg.listen_port_v6, (v,), f"ipv{v}") for v in versions]
    return [(cfg.listen_port, versions, cfg.mode)]


@register
class WireGuard(Backend[WireGuardConfig]):
    type = "wireguard"
    config_type = WireGuardConfig

    options = (
        Option("--state-dir", "weftd's persistent state (the WireGuard key); not a tmpfs, so it survives reboots",
               NODE, path, default="/var/lib/weft", metavar="DIR"),
        Option("--wireguard-device", "wireguard backend: the device name; unique on the host (wireguard-go's "
               "control sockets are shared by all network namespaces)", NODE, ifname, default=DEFAULT_DEVICE,
               metavar="NAME"),
        Option("--wireguard-device-v6", "wireguard backend, Mode separate: the IPv6 device's name", NODE, ifname,
               shown_default="the --wireguard-device name and -v6", metavar="NAME"),
        Option("--wireguard-implementation", "wireguard backend: the kernel module where it exists (auto), or "
               "wireguard-go (userspace)", NODE, default="auto", choices=IMPLEMENTATIONS),
    )

    @classmethod
    def create(cls, ipr: IPRoute, cfg: BackendConfig, networks: list[netaddr.IPNetwork], underlay: Underlay,
               published: Attrs | None, args: argparse.Namespace) -> WireGuard:
        assert isinstance(cfg, WireGuardConfig)
        versions = tuple(int(n.version) for n in networks)
        plan = plan_tunnels(cfg, versions)
        for _, _, mode in plan:
            for v in (4, 6):
                if mode == f"ipv{v}" and underlay.address(v) is None:
                    raise BackendError(f"Backend.Mode {cfg.mode} reaches peers over IPv{v}, but the underlay "
                                      f"{underlay.ifname} has no IPv{v} address in use")
        v6_name = args.wireguard_device_v6 or f"{args.wireguard_device}-v6"
        names = [v6_name if cfg.mode == "separate" and fams == (6,) else args.wireguard_device for _, fams, _ in plan]
        for name in names:  # all of them before the first device is made
            if not valid_ifname(name):
                raise BackendError(f"WireGuard device name {name!r} is not a valid interface name (1-15 bytes): "
                                   "set --wireguard-device-v6")
        keys = load_keys(Path(args.state_dir))
        tunnels = []
        for name, (port, fams, mode) in zip(names, plan, strict=True):
            device = open_device(ipr, name, args.wireguard_implementation)
            log.info("WireGuard device %s: %s, port %d, IPv%s pods over IPv%s", name, device.implementation, port,
                     "+IPv".join(map(str, fams)), {"ipv4": "4", "ipv6": "6"}.get(mode, "4 or IPv6 (auto)"))
            tunnels.append(Tunnel(device, port, fams, mode))
        return cls(ipr, cfg, underlay, tunnels=tunnels, keys=keys, networks=networks)

    @classmethod
    def teardown(cls, ipr: IPRoute, args: argparse.Namespace) -> None:
        super().teardown(ipr, args)
        remove_device(ipr, args.wireguard_device)
        remove_device(ipr, args.wireguard_device_v6 or f"{args.wireguard_device}-v6")

    def __init__(self, ipr: IPRoute, cfg: WireGuardConfig, underlay: Underlay, *, tunnels: list[Tunnel],
                 keys: KeyPair, networks: list[netaddr.IPNetwork]) -> None:
        super().__init__(ipr, cfg, underlay)
        self.wg = cfg
        self.tunnels = tunnels
        self.keys = keys
        self.private_b64 = base64.b64encode(keys.private).decode()
        self.networks = networks
        self._lock = threading.Lock()  # the reconciliation and the restorer after a wireguard-go restart
        self._own: Lease | None = None
        self._peers: list[Lease] = []
        self.restored = 0
        for t in tunnels:
            t.device.on_restart = self._restore

    @property
    def device(self) -> Device:
        """The first device (the IPv4 one in Mode separate)."""
        return self.tunnels[0].device

    def attrs(self) -> Attrs:
        """One key for every device; per family the port a peer reaches this node's device at."""
        ports = {v: t.port for t in self.tunnels for v in (t.versions if self.wg.mode == "separate" else (4, 6))}
        data = LeaseData(self.keys.public_b64, ports.get(4) if self.underlay.ip is not None else None,
                         ports.get(6) if self.underlay.ip6 is not None else None)
        return Attrs(self.underlay.ip, self.type, data.to_json(4), self.underlay.ip6, data.to_json(6))

    def _overhead(self, t: Tunnel) -> int:
        """Per device, by the family of the underlay its packets travel over (auto: the larger, when this
        node has an IPv6 address a peer may be reached from)."""
        if t.mode == "ipv4":
            return OVERHEAD[4]
        if t.mode == "ipv6" or self.underlay.ip is None or self.underlay.ip6 is not None:
            return OVERHEAD[6]
        return OVERHEAD[4]

    def device_mtu(self, t: Tunnel) -> int:
        return (self.cfg.mtu or self.underlay.mtu) - self._overhead(t)

    def mtu(self) -> int:
        """The pods' MTU: the smallest of the devices' (a pod sends both families through one interface)."""
        return min(self.device_mtu(t) for t in self.tunnels)

    def setup(self, own: Lease) -> None:
        with self._lock:
            self._own = own
            for t in self.tunnels:
                self._setup(self.ipr, own, t)

    def _setup(self, ipr: IPRoute, own: Lease, t: Tunnel) -> None:
        if t.device.ensure(ipr):
            log.info("created %s (%s, port %d, MTU %d)", t.ifname, t.device.implementation, t.port,
                     self.device_mtu(t))
        link = t.device.link(ipr)
        if link is None:
            raise BackendError(f"{t.ifname} vanished while being set up")
        t.index = link["index"]
        state = t.device.state()
        key = self.private_b64 if state.private_key != self.private_b64 else None
        port = t.port if state.listen_port != t.port else None
        if key is not None or port is not None:
            t.device.set(private_key=key, listen_port=port)
            if key is not None:
                log.info("%s: private key set (public key %s)", t.ifname, self.keys.public_b64)
        if link.get("IFLA_MTU") != self.device_mtu(t):
            ipr.link("set", index=t.index, mtu=self.device_mtu(t))
        if not link["flags"] & 1:  # IFF_UP
            ipr.link("set", index=t.index, state="up")
        # Each subnet's network address as /32 (/128): the source of host-to-pod traffic, within the
        # AllowedIPs peers have for this node.
        for v in (4, 6):
            subnet = own.family_subnet(v) if v in t.versions else None
            family, plen = (socket.AF_INET, 32) if v == 4 else (socket.AF_INET6, 128)
            want = str(subnet.network) if subnet is not None else None
            for a in ipr.get_addr(family=family, index=t.index):
                if a.get("IFA_ADDRESS") != want or a["prefixlen"] != plen:
                    if v == 6 and netaddr.IPAddress(a.get("IFA_ADDRESS")).is_link_local():
                        continue
                    ignore_errno(ipr.addr, "del", index=t.index, address=a.get("IFA_ADDRESS"),
                                 prefixlen=a["prefixlen"], codes=(errno.EADDRNOTAVAIL,))
            if want is not None:
                extra = {"flags": IFA_F_NODAD} if v == 6 else {}
                ignore_errno(ipr.addr, "add", index=t.index, address=want, prefixlen=plen, codes=(errno.EEXIST,),
                             **extra)

    def reconcile(self, own: Lease, peers: list[Lease]) -> Stats:
        with self._lock:
            self._own, self._peers = own, list(peers)
            for t in self.tunnels:
                self._setup(self.ipr, own, t)  # a deleted device or a lost key or port comes back first
            return self._apply(self.ipr, own, peers)

    def _apply(self, ipr: IPRoute, own: Lease, peers: list[Lease]) -> Stats:
        stats = Stats(peers=len(peers))
        unreachable: set[str] = set()
        for t in self.tunnels:
            desired = desired_peers(own, self.keys.public_b64, peers, t.port, self.wg.keepalive, self.wg.psk,
                                    versions=t.versions, mode=t.mode)
            self._report(t, desired)
            actual = t.device.state().peers
            ops = plan(desired.peers, actual)
            if ops:
                t.device.set(ops=ops)
                for op in ops:
                    if isinstance(op, RemovePeer):
                        node = t.nodes.get(op.public_key, "unknown to the store")
                        log.info("%s: removed peer %s (%s)", t.ifname, node, op.public_key)
                    else:
                        assert isinstance(op, SetPeer)
                        self._log_set(t, op.peer, desired.nodes[op.peer.public_key], actual.get(op.peer.public_key))
                stats.changes += len(ops)
            t.nodes = dict(desired.nodes)
            unreachable |= set(desired.refused)
        stats.unreachable = sorted(unreachable)
        routes = {net: RouteSpec(None, t.index) for net in self.networks for t in self.tunnels
                  if net.version in t.versions}
        sync_routes(routes, stats)
        return stats

    def _log_set(self, t: Tunnel, peer: PeerConfig, node: str, had: Any) -> None:
        if had is None:
            log.info("%s: added peer %s (%s) at %s, allowed IPs %s", t.ifname, node, peer.public_key,
                     peer.endpoint, ",".join(peer.allowed_ips))
            return
        what = [f"{name} {getattr(had.config, attr)} -> {getattr(peer, attr)}"
                for name, attr in (("endpoint", "endpoint"), ("allowed IPs", "allowed_ips"),
                                   ("keepalive", "keepalive")) if getattr(had.config, attr) != getattr(peer, attr)]
        if had.config.psk != peer.psk:
            what.append("preshared key")
        log.info("%s: fixed peer %s (%s): %s", t.ifname, node, peer.public_key, "; ".join(what))

    def _report(self, t: Tunnel, desired: Desired) -> None:
        """Refusals are logged when they change, not every round."""
        if desired.refused == t.refused:
            return
        for node, why in sorted(desired.refused.items()):
            if t.refused.get(node) != why:
                log.error("wireguard %s: not programming peer %s: %s", t.ifname, node, why)
        for node in t.refused.keys() - desired.refused.keys():
            log.info("wireguard %s: peer %s is no longer refused", t.ifname, node)
        t.refused = dict(desired.refused)

    def _restore(self) -> None:
        """After wireguard-go came back empty: key, port, address, MTU, peers and routes again."""
        with self._lock:
            if self._own is None:
                return
            t0 = time.perf_counter()
            with IPRoute() as ipr:  # this runs in the supervisor's thread: a socket of its own
                for t in self.tunnels:
                    self._setup(ipr, self._own, t)
                self._apply(ipr, self._own, self._peers)
            self.restored += 1
            log.info("%s restored: %d peers configured in %.3fs", ", ".join(t.ifname for t in self.tunnels),
                     sum(len(t.nodes) for t in self.tunnels), time.perf_counter() - t0)

    def info(self) -> dict[str, str]:
        return {"wireguard": "; ".join(f"{t.device.describe()}, device {t.ifname}, port {t.port}" for t in self.tunnels)
                + f", public key {self.keys.public_b64}"}

    def observe(self, metrics: Any) -> None:
        for t in self.tunnels:
            metrics.wireguard_implementation.labels(t.device.implementation, t.ifname).set(1)
        metrics.wireguard_peers.set(max(len(t.nodes) for t in self.tunnels))
        metrics.wireguard_restarts.set(sum(getattr(t.device, "restarts", 0) for t in self.tunnels))

    def close(self) -> None:
        for t in self.tunnels:
            t.device.close()
