"""Backends program the kernel so this node reaches every peer's pod subnet (Flannel's backend.Backend).

Each backend is one module of this package that registers its class with `@register`; the class
names its `Backend.Type` and parses its own config (`config_type`). `parse_config` and `create`
are the only places that look at the type string. Adding a backend is adding a module here.

Ownership: routes Weft installs carry route protocol PROTO; links carry the
link group weftlib.kernel.netlink.GROUP; every neighbour and FDB entry on
Weft's own VTEP is Weft's. Reconciliation only ever deletes those.
"""

from __future__ import annotations

import argparse
import builtins
import errno
import logging
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import netaddr
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ndmsg import NTF_SELF, NUD_NOARP, NUD_PERMANENT

from weftd.config import ConfigError
from weftd.lease import Attrs, Lease
from weftd.options import Option
from weftlib.gojson import lookup_ci
from weftlib.kernel.rtnl import (
    IFINFOMSG,
    NDA_DST,
    NDA_IFINDEX,
    NDA_LLADDR,
    NDMSG,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    RTA_DST,
    RTA_GATEWAY,
    RTA_OIF,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTMSG,
    U32,
    Rtnl,
    attribute,
    attributes,
)
from weftlib.registry import import_modules

if TYPE_CHECKING:
    from weftd.config import NetworkConfig

log = logging.getLogger("weftd.backend")
PROTO = 119  # route protocol number marking Weft's routes (`ip route show proto 119`)
RTNH_F_ONLINK = 4
MAIN_TABLE = 254
SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete: any scope
RTN_UNICAST = 1
AF_BRIDGE = 7
DEFAULT_TYPE = "vxlan"


class BackendError(Exception):
    pass


@dataclass(frozen=True)
class BackendConfig:
    """`Backend` in the network config: what every backend understands. Backends extend it."""

    type: str
    mtu: int | None = None  # the underlay MTU to assume; default: the interface's

    @classmethod
    def fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments from `d`; subclasses add theirs."""
        mtu = lookup_ci(d, "MTU")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535):
            raise ConfigError(f"Backend.MTU {mtu!r} must be an integer from 576 to 65535")
        return {"type": lookup_ci(d, "Type", DEFAULT_TYPE), "mtu": mtu}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> BackendConfig:
        return cls(**cls.fields(d))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Type": self.type}
        if self.mtu:
            out["MTU"] = self.mtu
        return out


@dataclass(frozen=True)
class Underlay:
    """The interface peers reach this node through, and its address in each enabled family."""

    ifname: str
    index: int
    ip: netaddr.IPAddress | None  # None: IPv4 is off (an IPv6-only cluster)
    mtu: int
    ip6: netaddr.IPAddress | None = None  # None: IPv6 is off

    def address(self, version: int) -> netaddr.IPAddress | None:
        return self.ip if version == 4 else self.ip6


_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
IFA_F_TENTATIVE, IFA_F_DADFAILED, IFA_F_DEPRECATED = 0x40, 0x08, 0x20


def _global_addresses(ipr: IPRoute, version: int, index: int | None = None) -> list[tuple[int, str]]:
    """(interface index, address) of usable global addresses: no link-local, no failed or deprecated IPv6.
    Addresses still in duplicate address detection come last: one of them is picked only if there is no
    other, since it may yet fail."""
    out = []
    kw = {} if index is None else {"index": index}
    for a in ipr.get_addr(family=_AF[version], **kw):
        flags = a.get("IFA_FLAGS") or a["flags"]
        if a["scope"] == 0 and not flags & (IFA_F_DADFAILED | IFA_F_DEPRECATED):
            out.append((bool(flags & IFA_F_TENTATIVE), a["index"], a.get("IFA_ADDRESS")))
    out.sort(key=lambda t: t[0])  # stable: the kernel's order otherwise
    return [(i, addr) for _, i, addr in out]


def find_underlay(ipr: IPRoute, iface: str | None = None, public_ip: str | None = None,
                  public_ipv6: str | None = None, versions: tuple[int, ...] = (4,)) -> Underlay:
    """By interface name, by an address it holds, or else the interface of the default route of the first
    enabled family; then its address in every enabled family (`versions`)."""
    index = None
    wanted = {4: public_ip, 6: public_ipv6}
    if iface:
        found = ipr.link_lookup(ifname=iface)
        if not found:
            raise BackendError(f"--iface {iface}: no such interface")
        index = found[0]
    elif any(wanted[v] for v in versions):
        v = next(v for v in versions if wanted[v])
        index = next((i for i, a in _global_addresses(ipr, v) if netaddr.IPAddress(a) == netaddr.IPAddress(wanted[v])),
                     None)
        if index is None:
            raise BackendError(f"{'--public-ip' if v == 4 else '--public-ipv6'} {wanted[v]}: no interface holds it")
    else:
        for v in versions:
            for r in ipr.get_routes(family=_AF[v], table=MAIN_TABLE):
                if r["dst_len"] == 0 and r.get("RTA_OIF"):
                    index = r.get("RTA_OIF")
                    break
            if index is not None:
                break
        if index is None:
            raise BackendError(f"no {' or '.join(f'IPv{v}' for v in versions)} default route; name the underlay "
                               "interface with --iface, --public-ip or --public-ipv6")
    link = ipr.link("get", index=index)[0]
    name = link.get("IFLA_IFNAME")
    got: dict[int, netaddr.IPAddress | None] = {4: None, 6: None}
    for v in versions:
        addrs = [netaddr.IPAddress(a) for _, a in _global_addresses(ipr, v, index)]
        if wanted[v]:
            if netaddr.IPAddress(wanted[v]) not in addrs:
                raise BackendError(f"{'--public-ip' if v == 4 else '--public-ipv6'} {wanted[v]}: {name} does not "
                                   "hold it")
            got[v] = netaddr.IPAddress(wanted[v])
        elif addrs:
            got[v] = addrs[0]
        else:
            raise BackendError(f"{name} has no global IPv{v} address" +
                               ("; IPv6 needs one on the underlay (or --public-ipv6)" if v == 6 else ""))
    return Underlay(name, index, got[4], link.get("IFLA_MTU"), got[6])


@dataclass
class Stats:
    peers: int = 0
    routes: int = 0
    neighbours: int = 0
    fdb: int = 0
    unreachable: list[str] = field(default_factory=list)
    changes: int = 0


@dataclass(frozen=True)
class RouteSpec:
    gateway: str | None  # None: a device route (scope link), as through a WireGuard device
    oif: int
    onlink: bool = False


def _packed(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


def _family(packed: bytes) -> int:
    return socket.AF_INET if len(packed) == 4 else socket.AF_INET6


def _text(packed: bytes) -> str:
    return socket.inet_ntop(_family(packed), packed)


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _u32(value: bytes | None) -> int | None:
    return None if value is None else U32.unpack(value)[0]


@contextmanager
def _socket(rt: Rtnl | None) -> Iterator[Rtnl]:
    """`rt`, or a socket of this call's own (each thread opens its own)."""
    if rt is not None:
        yield rt
        return
    with Rtnl() as own:
        yield own


def on_link(ips: list[netaddr.IPAddress], underlay: Underlay, rt: Rtnl | None = None) -> set[netaddr.IPAddress]:
    """Those of `ips` reached directly through the underlay, with no router between (one batch of route gets)."""
    unique = list(dict.fromkeys(ips))
    requests = []
    for ip in unique:
        packed = ip.packed
        body = RTMSG.pack(_family(packed), len(packed) * 8, 0, 0, 0, 0, 0, 0, 0) + attribute(RTA_DST, packed)
        requests.append((RTM_GETROUTE, NLM_F_REQUEST, body))
    with _socket(rt) as sock:
        answers = sock.batch(requests)
    out = set()
    for ip, answer in zip(unique, answers, strict=True):
        if isinstance(answer, bytes):
            a = attributes(answer, RTMSG.size)
            if RTA_GATEWAY not in a and _u32(a.get(RTA_OIF)) == underlay.index:
                out.add(ip)
    return out


_DELETES = (RTM_DELROUTE, RTM_DELNEIGH)


def _apply(rt: Rtnl, requests: list[tuple[int, int, bytes]], what: list[tuple[Any, ...]],
           describe: Callable[..., str], ignore: tuple[int, ...], stats: Stats) -> None:
    """Sends the changes in batches; counts the ones made; raises on the first refused (after trying them all).

    `ignore`: the errnos of a delete whose entry is already gone. Only deletes: an add refused with
    the same errno did not happen, and passing it over would report a converged kernel that lacks
    the entry, round after round. `describe(*what[i])` names change i in an error (only failures are
    described: 5,000 strings cost)."""
    failed = []
    for (kind, _, _), answer, name in zip(requests, rt.batch(requests), what, strict=True):
        if answer == 0:
            stats.changes += 1
        elif isinstance(answer, int) and not (kind in _DELETES and answer in ignore):
            failed.append(f"{describe(*name)}: {os.strerror(answer)}")
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise BackendError(f"{failed[0]}{more}")


def _describe_route(dst: bytes, dst_len: int, via: str | int | None) -> str:
    return f"route {_text(dst)}/{dst_len} via {via}" if via is not None else f"deleting route {_text(dst)}/{dst_len}"


def _describe_neighbour(ip: bytes, mac: bytes | None) -> str:
    return f"neighbour {_text(ip)} at {mac.hex(':')}" if mac is not None else f"deleting neighbour {_text(ip)}"


def _describe_fdb(mac: bytes, dst: bytes, add: bool) -> str:
    return f"{'' if add else 'deleting '}FDB entry {mac.hex(':')} -> {_text(dst)}"


def sync_routes(desired: dict[netaddr.IPNetwork, RouteSpec], stats: Stats, rt: Rtnl | None = None) -> None:
    """Makes Weft's routes (proto PROTO, main table, both families) exactly `desired`.

    One dump, then only the differences, sent in batches: a route of another protocol or table is
    never looked at, a Weft route that drifted is replaced, one nobody wants is deleted.
    """
    want: dict[tuple[bytes, int], tuple[bytes | None, int, bool]] = {}
    for dst, spec in desired.items():
        gateway = _packed(spec.gateway) if spec.gateway else None
        want[(dst.network.packed, dst.prefixlen)] = (gateway, spec.oif, spec.onlink)
    with _socket(rt) as sock:
        have: dict[tuple[bytes, int], tuple[bytes | None, int | None, bool]] = {}
        for body in sock.dump_raw(RTM_GETROUTE, RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)):
            family, dst_len, _src, _tos, table, proto, _scope, _kind, flags = RTMSG.unpack_from(body)
            if proto != PROTO or table != MAIN_TABLE or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            a = attributes(body, RTMSG.size)
            dst = a.get(RTA_DST) or bytes(4 if family == socket.AF_INET else 16)
            have[(dst, dst_len)] = (a.get(RTA_GATEWAY), _u32(a.get(RTA_OIF)), bool(flags & RTNH_F_ONLINK))
        requests: list[tuple[int, int, bytes]] = []
        what: list[tuple[Any, ...]] = []
        for dst, dst_len in have.keys() - want.keys():
            body = RTMSG.pack(_family(dst), dst_len, 0, 0, MAIN_TABLE, PROTO, RT_SCOPE_NOWHERE, 0, 0)
            requests.append((RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, body + attribute(RTA_DST, dst)))
            what.append((dst, dst_len, None))
        for key, (gateway, oif, onlink) in want.items():
            if have.get(key) == (gateway, oif, onlink):
                continue
            dst, dst_len = key
            body = RTMSG.pack(_family(dst), dst_len, 0, 0, MAIN_TABLE, PROTO, SCOPE_LINK if gateway is None else 0,
                              RTN_UNICAST, RTNH_F_ONLINK if onlink else 0)
            body += attribute(RTA_DST, dst) + attribute(RTA_OIF, U32.pack(oif))
            if gateway is not None:
                body += attribute(RTA_GATEWAY, gateway)
            requests.append((RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body))
            what.append((dst, dst_len, _text(gateway) if gateway else oif))
        _apply(sock, requests, what, _describe_route, (errno.ESRCH,), stats)
    stats.routes = len(desired)


def sync_neighbours(ifindex: int, desired: dict[str, str], families: tuple[int, ...], stats: Stats,
                    rt: Rtnl | None = None) -> None:
    """Makes the neighbours of `families` on link `ifindex` exactly `desired` (IP: MAC), all permanent.

    For a device that is Weft's own: every neighbour of those families on it is Weft's, but for
    the kernel's NOARP entries.
    """
    want = {_packed(ip): _mac_bytes(mac) for ip, mac in desired.items()}
    with _socket(rt) as sock:
        have: dict[bytes, tuple[bytes | None, int]] = {}
        for family in families:
            query = NDMSG.pack(family, 0, 0, 0, 0) + attribute(NDA_IFINDEX, U32.pack(ifindex))
            for body in sock.dump_raw(RTM_GETNEIGH, query):
                fam, index, state, _flags, _kind = NDMSG.unpack_from(body)
                if index != ifindex or fam != family:
                    continue
                if state & NUD_NOARP:  # the kernel's own (multicast, from MLD), remade as it needs them
                    continue
                a = attributes(body, NDMSG.size)
                if NDA_DST in a:
                    have[a[NDA_DST]] = (a.get(NDA_LLADDR), state)
        requests: list[tuple[int, int, bytes]] = []
        what: list[tuple[Any, ...]] = []
        for ip in have.keys() - want.keys():
            body = NDMSG.pack(_family(ip), ifindex, 0, 0, 0) + attribute(NDA_DST, ip)
            requests.append((RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, body))
            what.append((ip, None))
        for ip, mac in want.items():
            had = have.get(ip)
            if had is not None and had[0] == mac and had[1] & NUD_PERMANENT:
                continue
            body = NDMSG.pack(_family(ip), ifindex, NUD_PERMANENT, 0, 0)
            body += attribute(NDA_DST, ip) + attribute(NDA_LLADDR, mac)
            requests.append((RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body))
            what.append((ip, mac))
        _apply(sock, requests, what, _describe_neighbour, (errno.ENOENT,), stats)
    stats.neighbours += len(desired)


def sync_fdb(ifindex: int, desired: dict[str, str], stats: Stats, rt: Rtnl | None = None) -> None:
    """Makes the remote FDB entries of VXLAN device `ifindex` exactly `desired` (MAC: remote IP), one remote each."""
    want = {_mac_bytes(mac): _packed(ip) for mac, ip in desired.items()}
    with _socket(rt) as sock:
        have: dict[bytes, list[bytes]] = {}
        # An ifinfomsg header: the kernel then dumps only port `ifindex`.
        for body in sock.dump_raw(RTM_GETNEIGH, IFINFOMSG.pack(AF_BRIDGE, 0, ifindex, 0, 0)):
            _fam, index, _state, _flags, _kind = NDMSG.unpack_from(body)
            if index != ifindex:
                continue
            a = attributes(body, NDMSG.size)
            if NDA_DST in a and NDA_LLADDR in a:
                have.setdefault(a[NDA_LLADDR], []).append(a[NDA_DST])
        requests: list[tuple[int, int, bytes]] = []
        what: list[tuple[Any, ...]] = []
        for mac, dsts in have.items():
            for dst in dsts:
                if want.get(mac) != dst:
                    body = NDMSG.pack(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0)
                    body += attribute(NDA_LLADDR, mac) + attribute(NDA_DST, dst)
                    requests.append((RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, body))
                    what.append((mac, dst, False))
        for mac, dst in want.items():
            if dst in have.get(mac, ()):  # its other remotes, if any, are deleted above
                continue
            body = NDMSG.pack(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0)
            body += attribute(NDA_LLADDR, mac) + attribute(NDA_DST, dst)
            requests.append((RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body))
            what.append((mac, dst, True))
        _apply(sock, requests, what, _describe_fdb, (errno.ENOENT,), stats)
    stats.fdb += len(desired)


C = TypeVar("C", bound=BackendConfig)


class Backend(ABC, Generic[C]):
    type: ClassVar[str]
    config_type: ClassVar[builtins.type[BackendConfig]] = BackendConfig
    # The backend's own options, for `weftd run` and `weftd uninstall` (every backend's are accepted).
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, ipr: IPRoute, cfg: C, underlay: Underlay, published: Attrs | None = None) -> None:
        """`published`: what this node published with its lease before this start, if anything."""
        self.ipr = ipr
        self.cfg = cfg
        self.underlay = underlay

    @classmethod
    def create(cls, ipr: IPRoute, network: NetworkConfig, underlay: Underlay, published: Attrs | None,
               args: argparse.Namespace) -> Backend[Any]:
        """The backend for `network` (whose `backend` is of this type), with the command line's flags."""
        cfg: Any = network.backend  # parsed by this class's config_type (parse_config)
        return cls(ipr, cfg, underlay, published)

    @abstractmethod
    def attrs(self) -> Attrs:
        """What peers need to reach this node, published with its lease."""

    @abstractmethod
    def mtu(self) -> int:
        """The pod MTU this backend allows."""

    def setup(self, own: Lease) -> None:
        """Creates the devices the backend needs; idempotent."""

    @abstractmethod
    def reconcile(self, own: Lease, peers: list[Lease]) -> Stats:
        """Makes the kernel match `peers` exactly: adds what is missing, fixes drift, removes the rest."""

    @classmethod
    def teardown(cls, ipr: IPRoute, args: argparse.Namespace) -> None:
        """Removes everything a backend of this type may have made on the node, whatever its config (uninstall)."""
        sync_routes({}, Stats())

    def info(self) -> dict[str, str]:
        """What /healthz says about the backend beyond ok or not."""
        return {}

    def observe(self, metrics: Any) -> None:
        """Sets the backend's own metrics after a reconciliation."""

    def close(self) -> None:
        """weftd stops; the kernel state stays."""

    @property
    def versions(self) -> list[int]:
        """The address families this node carries: those it has an underlay address for."""
        return [v for v in (4, 6) if self.underlay.address(v) is not None]

    def hostgw_routes(self, peers: list[Lease], stats: Stats) -> dict[netaddr.IPNetwork, RouteSpec]:
        """Routes to peers' subnets through their underlay address of the same family, for every family in which
        the peer is on-link. A peer unreachable in any family it shares with this node is reported."""
        out = {}
        gateways = [gw for p in peers for v in self.versions if (gw := p.attrs.public(v)) is not None]
        direct = on_link(gateways, self.underlay)
        for p in peers:
            reached = True
            for v in self.versions:
                subnet, gw = p.family_subnet(v), p.attrs.public(v)
                if subnet is None:
                    continue
                if gw is not None and gw in direct:
                    out[subnet] = RouteSpec(str(gw), self.underlay.index)
                else:
                    reached = False
            if not reached:
                stats.unreachable.append(p.node)
        return out


_registry: dict[str, type[Backend[Any]]] = {}


def register(cls: type[Backend[Any]]) -> type[Backend[Any]]:
    """Class decorator: makes a backend known by its `type`."""
    _registry[cls.type] = cls
    return cls


def types() -> dict[str, type[Backend[Any]]]:
    """Every backend, by type: the modules of this package register theirs when imported."""
    import_modules(__name__, __path__)
    return _registry


def parse_config(d: Mapping[str, Any] | None) -> BackendConfig:
    """`Backend` from the network config, parsed by the backend it names."""
    d = d or {}
    if not isinstance(d, Mapping):
        raise ConfigError("Backend must be a JSON object")
    kind = lookup_ci(d, "Type", DEFAULT_TYPE)
    known = types()
    if not isinstance(kind, str) or kind not in known:
        raise ConfigError(f"Backend.Type {kind!r} must be one of {tuple(sorted(known))}")
    return known[kind].config_type.parse(d)


def create(ipr: IPRoute, network: NetworkConfig, underlay: Underlay, published: Attrs | None,
           args: argparse.Namespace) -> Backend[Any]:
    """The backend the network config names."""
    return types()[network.backend.type].create(ipr, network, underlay, published, args)
