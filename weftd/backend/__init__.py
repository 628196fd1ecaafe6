"""Backends program the kernel so this node reaches every peer's pod subnet (Flannel's backend.Backend).

Ownership: routes Weft installs carry route protocol PROTO; links carry the
link group of cni_plugin.attachment.GROUP; every neighbour and FDB entry on
Weft's own VTEP is Weft's. Reconciliation only ever deletes those.
"""

from __future__ import annotations

import errno
import logging
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import netaddr
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_plugin.attachment import ignore_errno
from weftd.config import BackendConfig
from weftd.lease import Attrs, Lease

log = logging.getLogger("weftd.backend")
PROTO = 119  # route protocol number marking Weft's routes (`ip route show proto 119`)
RTNH_F_ONLINK = 4
MAIN_TABLE = 254


class BackendError(Exception):
    pass


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
    gateway: str
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
        try:
            ipr.route("replace", dst=str(dst), gateway=spec.gateway, oif=spec.oif, proto=PROTO, table=MAIN_TABLE,
                      **({"flags": RTNH_F_ONLINK} if spec.onlink else {}))
            stats.changes += 1
        except NetlinkError as e:
            raise BackendError(f"route {dst} via {spec.gateway}: {e}") from None
    stats.routes = len(desired)


class Backend(ABC):
    type: str

    def __init__(self, ipr: IPRoute, cfg: BackendConfig, underlay: Underlay) -> None:
        self.ipr = ipr
        self.cfg = cfg
        self.underlay = underlay

    @abstractmethod
    def attrs(self) -> Attrs:
        """What peers need to reach this node, published with its lease."""

    @abstractmethod
    def mtu(self) -> int:
        """The pod MTU this backend allows."""

    def setup(self, own: Lease) -> None:  # noqa: B027 - most backends need no device
        """Creates the devices the backend needs; idempotent."""

    @abstractmethod
    def reconcile(self, own: Lease, peers: list[Lease]) -> Stats:
        """Makes the kernel match `peers` exactly: adds what is missing, fixes drift, removes the rest."""

    def teardown(self) -> None:
        """Removes everything the backend made (uninstall)."""
        sync_routes(self.ipr, {}, Stats())

    def hostgw_routes(self, peers: list[Lease], stats: Stats) -> dict[netaddr.IPNetwork, RouteSpec]:
        """Routes to peers' subnets through their underlay address, for peers that are on-link."""
        out = {}
        for p in peers:
            if on_link(self.ipr, p.public_ip, self.underlay):
                out[p.subnet] = RouteSpec(str(p.public_ip), self.underlay.index)
            else:
                stats.unreachable.append(p.node)
        return out
