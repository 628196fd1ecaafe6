"""vxlan: a VTEP `weft.<VNI>`, and per peer a permanent neighbour, an FDB entry and an onlink route.

With DirectRouting, on-link peers get a host-gw route instead. The VTEP MAC is
kept across restarts (read back from the device or the published lease), so
peers' entries stay valid and a restart does not interrupt traffic.
"""

from __future__ import annotations

import argparse
import errno
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import netaddr
from pyroute2 import IPRoute

from weftd.backend import (
    Backend,
    BackendConfig,
    BackendError,
    RouteSpec,
    Stats,
    Underlay,
    log,
    register,
    sync_fdb,
    sync_neighbours,
    sync_routes,
)
from weftd.config import ConfigError
from weftd.lease import Attrs, Lease
from weftlib.gojson import lookup_ci
from weftlib.kernel import sysctl
from weftlib.kernel.netlink import GROUP, get_link, ignore_errno, kind, owned, random_mac
from weftlib.kernel.rtnl import Rtnl

OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14


@dataclass(frozen=True)
class VXLANConfig(BackendConfig):
    vni: int = 1
    port: int = 8472
    direct_routing: bool = False

    @classmethod
    def fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        vni, port = lookup_ci(d, "VNI", 1), lookup_ci(d, "Port", 8472) or 8472
        if not isinstance(vni, int) or isinstance(vni, bool) or not 1 <= vni < 1 << 24:
            raise ConfigError(f"Backend.VNI {vni!r} must be an integer from 1 to 16777215")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ConfigError(f"Backend.Port {port!r} must be a UDP port")
        direct = lookup_ci(d, "DirectRouting", False)
        if not isinstance(direct, bool):
            raise ConfigError("Backend.DirectRouting must be true or false")
        return {**super().fields(d), "vni": vni, "port": port, "direct_routing": direct}

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "VNI": self.vni, "Port": self.port, "DirectRouting": self.direct_routing}


@register
class VXLAN(Backend[VXLANConfig]):
    type = "vxlan"
    config_type = VXLANConfig

    def __init__(self, ipr: IPRoute, cfg: VXLANConfig, underlay: Underlay, published: Attrs | None = None) -> None:
        super().__init__(ipr, cfg, underlay, published)
        self.name = f"weft.{self.cfg.vni}"
        link = get_link(self.ipr, self.name)
        # Keep the MAC peers already know: the device's, else the one published with the lease.
        self.mac = (link.get("IFLA_ADDRESS") if owned(link)
                    else published.vtep_mac if published is not None and published.vtep_mac
                    else random_mac())
        self.index = -1

    def attrs(self) -> Attrs:
        return Attrs(self.underlay.ip, self.type, self.mac, self.cfg.vni)

    def mtu(self) -> int:
        return (self.cfg.mtu or self.underlay.mtu) - OVERHEAD

    def _compatible(self, link: Any) -> bool:
        info = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        return (info is not None and info.get("IFLA_VXLAN_ID") == self.cfg.vni
                and info.get("IFLA_VXLAN_PORT") == self.cfg.port
                and info.get("IFLA_VXLAN_LOCAL") == str(self.underlay.ip)
                and info.get("IFLA_VXLAN_LINK") == self.underlay.index
                and link.get("IFLA_ADDRESS") == self.mac)

    def setup(self, own: Lease) -> None:
        link = get_link(self.ipr, self.name)
        if link is not None and not owned(link):
            raise BackendError(f"{self.name} exists and was not created by weft; not touching it")
        if link is not None and not self._compatible(link):
            log.warning("%s does not match the config; recreating it", self.name)
            ignore_errno(self.ipr.link, "del", index=link["index"], codes=(errno.ENODEV,))
            link = None
        if link is None:
            self.ipr.link("add", ifname=self.name, kind="vxlan", vxlan_id=self.cfg.vni,
                          vxlan_local=str(self.underlay.ip), vxlan_port=self.cfg.port, vxlan_learning=0,
                          vxlan_link=self.underlay.index, address=self.mac, mtu=self.mtu(), group=GROUP)
            log.info("created %s (VNI %d, port %d, MAC %s, MTU %d)", self.name, self.cfg.vni, self.cfg.port,
                     self.mac, self.mtu())
            link = get_link(self.ipr, self.name)
        self.index = link["index"]
        sysctl.write(f"/proc/sys/net/ipv6/conf/{self.name}/accept_ra", "0")
        if link.get("IFLA_MTU") != self.mtu():
            self.ipr.link("set", index=self.index, mtu=self.mtu())
        self.ipr.link("set", index=self.index, state="up")
        # The subnet's network address as a /32: a source address for host-to-pod traffic, no broadcast routes.
        assert own.subnet is not None
        want = str(own.subnet.network)
        for a in self.ipr.get_addr(family=socket.AF_INET, index=self.index):
            if a.get("IFA_ADDRESS") != want or a["prefixlen"] != 32:
                ignore_errno(self.ipr.addr, "del", index=self.index, address=a.get("IFA_ADDRESS"),
                       prefixlen=a["prefixlen"], codes=(errno.EADDRNOTAVAIL,))
        ignore_errno(self.ipr.addr, "add", index=self.index, address=want, prefixlen=32, codes=(errno.EEXIST,))

    def reconcile(self, own: Lease, peers: list[Lease]) -> Stats:
        self.setup(own)  # a VTEP deleted behind our back comes back, and the diff below refills it
        stats = Stats(peers=len(peers))
        routes: dict[netaddr.IPNetwork, RouteSpec] = {}
        overlay = peers
        if self.cfg.direct_routing:
            routes = self.hostgw_routes(peers, stats)
            overlay = [p for p in peers if p.subnet not in routes]
            stats.unreachable = []
        neigh: dict[str, str] = {}
        fdb: dict[str, str] = {}
        for p in overlay:
            if p.subnet is None:
                continue
            if p.attrs.vtep_mac is None:
                log.warning("peer %s publishes no VTEP MAC (backend %s); skipping it", p.node, p.attrs.backend_type)
                stats.unreachable.append(p.node)
                continue
            neigh[str(p.subnet.network)] = p.attrs.vtep_mac
            fdb[p.attrs.vtep_mac] = str(p.public_ip)
            routes[p.subnet] = RouteSpec(str(p.subnet.network), self.index, onlink=True)
        # Neighbours and FDB first: the kernel would ARP for the onlink gateway otherwise.
        with Rtnl() as rt:
            sync_neighbours(self.index, neigh, (socket.AF_INET,), stats, rt)
            sync_fdb(self.index, fdb, stats, rt)
            sync_routes(routes, stats, rt)
        return stats

    @classmethod
    def teardown(cls, ipr: IPRoute, args: argparse.Namespace) -> None:
        super().teardown(ipr, args)
        for link in ipr.get_links():
            if owned(link) and kind(link) == "vxlan":
                ignore_errno(ipr.link, "del", index=link["index"], codes=(errno.ENODEV,))
