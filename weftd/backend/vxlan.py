"""vxlan: a VTEP per address family, and per peer a permanent neighbour, an FDB entry and an onlink route.

IPv4 pod traffic goes through `weft.<VNI>` over the IPv4 underlay, IPv6 pod traffic through
`weft6.<VNI>` over the IPv6 underlay (Flannel's two devices). Each device's MTU is the underlay's
minus its own encapsulation: 50 bytes over IPv4, 70 over IPv6 (Flannel takes 50 for both,
flannel#1781); pods get the smaller of the two, since one pod interface carries both families.
With DirectRouting, on-link peers get a host-gw route instead, per family. The VTEP MACs are
kept across restarts (read back from the devices or the published lease), so peers' entries stay
valid and a restart does not interrupt traffic.
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
from weftlib.kernel.rtnl import IFA_F_NODAD, Rtnl

# Outer IP header + UDP 8 + VXLAN 8 + inner Ethernet 14, by the underlay's family.
OVERHEAD = {4: 20 + 8 + 8 + 14, 6: 40 + 8 + 8 + 14}


@dataclass
class Vtep:
    """One family's VXLAN device: its name, MAC, the underlay address it sends from, and once set up its index."""

    version: int
    name: str
    mac: str
    local: netaddr.IPAddress
    index: int = -1

    @property
    def family(self) -> int:
        return socket.AF_INET if self.version == 4 else socket.AF_INET6


@dataclass
class Desired:
    """What one VTEP should hold: neighbours (peer subnet address -> VTEP MAC), FDB (MAC -> underlay address)."""

    neighbours: dict[str, str]
    fdb: dict[str, str]


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
        self.vteps: dict[int, Vtep] = {}
        for v in (4, 6):
            name = f"weft.{cfg.vni}" if v == 4 else f"weft6.{cfg.vni}"
            link = get_link(self.ipr, name)
            if v not in self.versions:
                if owned(link):  # the family was turned off: its VTEP goes, its routes go at reconciliation
                    log.info("IPv%d is off: removing %s", v, name)
                    ignore_errno(self.ipr.link, "del", index=link["index"], codes=(errno.ENODEV,))
                continue
            # Keep the MAC peers already know: the device's, else the one published with the lease.
            old = published.mac(v) if published is not None else None
            mac = link.get("IFLA_ADDRESS") if owned(link) else old or random_mac()
            local = underlay.address(v)
            assert local is not None
            self.vteps[v] = Vtep(v, name, mac, local)

    def attrs(self) -> Attrs:
        v4, v6 = self.vteps.get(4), self.vteps.get(6)
        return Attrs(self.underlay.ip, self.type, v4.mac if v4 else None, self.cfg.vni,
                     public_ipv6=self.underlay.ip6, vtep_mac6=v6.mac if v6 else None)

    def device_mtu(self, version: int) -> int:
        return (self.cfg.mtu or self.underlay.mtu) - OVERHEAD[version]

    def mtu(self) -> int:
        return min(self.device_mtu(v) for v in self.vteps)

    def _compatible(self, vtep: Vtep, link: Any) -> bool:
        info = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        local = "IFLA_VXLAN_LOCAL" if vtep.version == 4 else "IFLA_VXLAN_LOCAL6"
        return (info is not None and info.get("IFLA_VXLAN_ID") == self.cfg.vni
                and info.get("IFLA_VXLAN_PORT") == self.cfg.port
                and info.get(local) is not None and netaddr.IPAddress(info.get(local)) == vtep.local
                and info.get("IFLA_VXLAN_LINK") == self.underlay.index
                and link.get("IFLA_ADDRESS") == vtep.mac)

    def setup(self, own: Lease) -> None:
        for vtep in self.vteps.values():
            self._setup(vtep, own.family_subnet(vtep.version))

    def _setup(self, vtep: Vtep, subnet: netaddr.IPNetwork | None) -> None:
        link = get_link(self.ipr, vtep.name)
        if link is not None and not owned(link):
            raise BackendError(f"{vtep.name} exists and was not created by weft; not touching it")
        if link is not None and not self._compatible(vtep, link):
            log.warning("%s does not match the config; recreating it", vtep.name)
            ignore_errno(self.ipr.link, "del", index=link["index"], codes=(errno.ENODEV,))
            link = None
        mtu = self.device_mtu(vtep.version)
        if link is None:
            local = {"vxlan_local" if vtep.version == 4 else "vxlan_local6": str(vtep.local)}
            self.ipr.link("add", ifname=vtep.name, kind="vxlan", vxlan_id=self.cfg.vni, vxlan_port=self.cfg.port,
                          vxlan_learning=0, vxlan_link=self.underlay.index, address=vtep.mac, mtu=mtu, group=GROUP,
                          **local)
            log.info("created %s (VNI %d, port %d, local %s, MAC %s, MTU %d)", vtep.name, self.cfg.vni,
                     self.cfg.port, vtep.local, vtep.mac, mtu)
            link = get_link(self.ipr, vtep.name)
        vtep.index = link["index"]
        sysctl.write(f"/proc/sys/net/ipv6/conf/{vtep.name}/accept_ra", "0")
        if link.get("IFLA_MTU") != mtu:
            self.ipr.link("set", index=vtep.index, mtu=mtu)
        self.ipr.link("set", index=vtep.index, state="up")
        if subnet is None:
            return
        # The subnet's network address as a host address (/32, /128): a source address for host-to-pod traffic,
        # no broadcast routes. IPv6 without duplicate address detection, usable at once.
        want, plen = str(subnet.network), 32 if vtep.version == 4 else 128
        for a in self.ipr.get_addr(family=vtep.family, index=vtep.index):
            if a["scope"] == 0 and (a.get("IFA_ADDRESS") != want or a["prefixlen"] != plen):
                ignore_errno(self.ipr.addr, "del", index=vtep.index, address=a.get("IFA_ADDRESS"),
                             prefixlen=a["prefixlen"], codes=(errno.EADDRNOTAVAIL,))
        extra = {} if vtep.version == 4 else {"flags": IFA_F_NODAD}
        ignore_errno(self.ipr.addr, "add", index=vtep.index, address=want, prefixlen=plen, codes=(errno.EEXIST,),
                     **extra)

    def desired(self, peers: list[Lease], stats: Stats
                ) -> tuple[dict[int, Desired], dict[netaddr.IPNetwork, RouteSpec]]:
        """Per family, what each VTEP should hold, and the routes: host-gw routes for on-link peers with
        DirectRouting, onlink routes through the family's VTEP for the rest."""
        routes: dict[netaddr.IPNetwork, RouteSpec] = {}
        if self.cfg.direct_routing:
            routes = self.hostgw_routes(peers, Stats())
        want = {v: Desired({}, {}) for v in self.vteps}
        for p in peers:
            reached = True
            for v, vtep in self.vteps.items():
                subnet, mac, remote = p.family_subnet(v), p.attrs.mac(v), p.attrs.public(v)
                if subnet is None or subnet in routes:
                    continue
                if mac is None or remote is None:
                    log.warning("peer %s publishes no IPv%d VTEP (backend %s); skipping it", p.node, v,
                                p.attrs.backend_type)
                    reached = False
                    continue
                want[v].neighbours[str(subnet.network)] = mac
                want[v].fdb[mac] = str(remote)
                routes[subnet] = RouteSpec(str(subnet.network), vtep.index, onlink=True)
            if not reached:
                stats.unreachable.append(p.node)
        return want, routes

    def reconcile(self, own: Lease, peers: list[Lease]) -> Stats:
        self.setup(own)  # a VTEP deleted behind our back comes back, and the diff below refills it
        stats = Stats(peers=len(peers))
        want, routes = self.desired(peers, stats)
        # Neighbours and FDB first: the kernel would ARP (or solicit) for the onlink gateway otherwise.
        with Rtnl() as rt:
            for v, vtep in self.vteps.items():
                sync_neighbours(vtep.index, want[v].neighbours, (vtep.family,), stats, rt)
                sync_fdb(vtep.index, want[v].fdb, stats, rt)
            sync_routes(routes, stats, rt)
        return stats

    @classmethod
    def teardown(cls, ipr: IPRoute, args: argparse.Namespace) -> None:
        super().teardown(ipr, args)
        for link in ipr.get_links():
            if owned(link) and kind(link) == "vxlan":
                ignore_errno(ipr.link, "del", index=link["index"], codes=(errno.ENODEV,))
