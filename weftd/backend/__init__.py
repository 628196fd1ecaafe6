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
import socket
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import netaddr
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weftd.config import ConfigError, Env
from weftd.lease import Attrs, Lease
from weftlib.gojson import lookup_ci
from weftlib.kernel.netlink import ignore_errno
from weftlib.registry import import_modules

if TYPE_CHECKING:
    from weftd.config import NetworkConfig

log = logging.getLogger("weftd.backend")
PROTO = 119  # route protocol number marking Weft's routes (`ip route show proto 119`)
RTNH_F_ONLINK = 4
MAIN_TABLE = 254
SCOPE_LINK = 253
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
    """The interface peers reach this node through."""

    ifname: str
    index: int
    ip: netaddr.IPAddress
    mtu: int


def find_underlay(ipr: IPRoute, iface: str | None = None, public_ip: str | None = None) -> Underlay:
    """By interface name, by the address it holds, or else the interface of the IPv4 default route."""
    index = None
    if iface:
        found = ipr.link_lookup(ifname=iface)
        if not found:
            raise BackendError(f"interface {iface} does not exist")
        index = found[0]
    elif public_ip:
        for a in ipr.get_addr(family=socket.AF_INET):
            if a.get("IFA_ADDRESS") == public_ip:
                index = a["index"]
        if index is None:
            raise BackendError(f"no interface holds {public_ip}")
    else:
        for r in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            if r["dst_len"] == 0 and r.get("RTA_OIF"):
                index = r.get("RTA_OIF")
                break
        if index is None:
            raise BackendError("no default route; name the underlay interface with --iface or --public-ip")
    link = ipr.link("get", index=index)[0]
    addrs = [a.get("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET, index=index)]
    if public_ip and public_ip not in addrs:
        raise BackendError(f"{link.get('IFLA_IFNAME')} does not hold {public_ip}")
    ip = public_ip or (addrs[0] if addrs else None)
    if ip is None:
        raise BackendError(f"{link.get('IFLA_IFNAME')} has no IPv4 address")
    return Underlay(link.get("IFLA_IFNAME"), index, netaddr.IPAddress(ip), link.get("IFLA_MTU"))


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


def on_link(ipr: IPRoute, ip: netaddr.IPAddress, underlay: Underlay) -> bool:
    """True if `ip` is reached directly through the underlay, with no router between."""
    try:
        r = ipr.route("get", dst=str(ip))[0]
    except NetlinkError:
        return False
    return r.get("RTA_GATEWAY") is None and r.get("RTA_OIF") == underlay.index


def sync_routes(ipr: IPRoute, desired: dict[netaddr.IPNetwork, RouteSpec], stats: Stats) -> None:
    """Makes Weft's routes (proto PROTO, main table) exactly `desired`."""
    actual: dict[netaddr.IPNetwork, Any] = {}
    for r in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        if r["proto"] == PROTO:
            actual[netaddr.IPNetwork(f"{r.get('RTA_DST') or '0.0.0.0'}/{r['dst_len']}")] = r
    for dst in actual:
        if dst not in desired:
            ignore_errno(ipr.route, "del", dst=str(dst), table=MAIN_TABLE, proto=PROTO, codes=(errno.ESRCH,))
            stats.changes += 1
    for dst, spec in desired.items():
        have = actual.get(dst)
        if have is not None and have.get("RTA_GATEWAY") == spec.gateway and have.get("RTA_OIF") == spec.oif:
            continue
        extra: dict[str, Any] = {"gateway": spec.gateway} if spec.gateway else {"scope": SCOPE_LINK}
        if spec.onlink:
            extra["flags"] = RTNH_F_ONLINK
        try:
            ipr.route("replace", dst=str(dst), oif=spec.oif, proto=PROTO, table=MAIN_TABLE, **extra)
            stats.changes += 1
        except NetlinkError as e:
            raise BackendError(f"route {dst} via {spec.gateway or spec.oif}: {e}") from None
    stats.routes = len(desired)


C = TypeVar("C", bound=BackendConfig)


class Backend(ABC, Generic[C]):
    type: ClassVar[str]
    config_type: ClassVar[builtins.type[BackendConfig]] = BackendConfig

    def __init__(self, ipr: IPRoute, cfg: C, underlay: Underlay, published: Attrs | None = None) -> None:
        """`published`: what this node published with its lease before this start, if anything."""
        self.ipr = ipr
        self.cfg = cfg
        self.underlay = underlay

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, env: Env) -> None:
        """Adds the backend's own flags to `weftd run` and `weftd uninstall` (every backend's are accepted)."""

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
        sync_routes(ipr, {}, Stats())

    def info(self) -> dict[str, str]:
        """What /healthz says about the backend beyond ok or not."""
        return {}

    def observe(self, metrics: Any) -> None:
        """Sets the backend's own metrics after a reconciliation."""

    def close(self) -> None:
        """weftd stops; the kernel state stays."""

    def hostgw_routes(self, peers: list[Lease], stats: Stats) -> dict[netaddr.IPNetwork, RouteSpec]:
        """Routes to peers' subnets through their underlay address, for peers that are on-link."""
        out = {}
        for p in peers:
            if on_link(self.ipr, p.public_ip, self.underlay):
                out[p.subnet] = RouteSpec(str(p.public_ip), self.underlay.index)
            else:
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
