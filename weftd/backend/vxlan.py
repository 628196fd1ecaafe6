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
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import netaddr
from pyroute2 import IPRoute

from weftd.backend import Backend, BackendConfig, log, register
from weftd.backend.errors import BackendConfigError, BackendError
from weftd.backend.sync import RouteSpec, Stats, sync_fdb, sync_neighbours, sync_routes
from weftd.backend.underlay import Underlay
from weftd.lease import Attrs, Lease
from weftlib.gojson import lookup_ci
from weftlib.kernel import sysctl
from weftlib.kernel.netlink import GROUP, random_mac
from weftlib.kernel.rtnl import (
    BE16,
    IFA_F_NODAD,
    IFLA_ADDRESS,
    IFLA_GROUP,
    IFLA_IFNAME,
    IFLA_MTU,
    IFLA_VXLAN_ID,
    IFLA_VXLAN_LEARNING,
    IFLA_VXLAN_LINK,
    IFLA_VXLAN_LOCAL,
    IFLA_VXLAN_LOCAL6,
    IFLA_VXLAN_PORT,
    RT_SCOPE_UNIVERSE,
    LinkFacts,
    Rtnl,
    attribute,
    attributes,
    get_u32,
    nla_link_info,
    nla_mac,
    nla_str,
    nla_u8,
    nla_u32,
)

# Outer IP header + UDP 8 + VXLAN 8 + inner Ethernet 14, by the underlay's family.
OVERHEAD = {4: 20 + 8 + 8 + 14, 6: 40 + 8 + 8 + 14}
_CANONICAL_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


def canonical_mac(raw: Any) -> str:
    """A MAC as the kernel prints it; the plain spelling (all that Weft and Flannel write) without netaddr's
    parser, which costs at every change of 5,000 peers' leases. Raises ValueError."""
    if isinstance(raw, str) and _CANONICAL_MAC.fullmatch(raw):
        return raw
    try:
        return str(netaddr.EUI(raw, dialect=netaddr.mac_unix_expanded))
    except (netaddr.AddrFormatError, TypeError) as e:
        raise ValueError(f"VtepMAC {raw!r}: {e}") from None


@dataclass(frozen=True)
class VtepData:
    """A lease's backend data for one family (Flannel's vxlanLeaseAttrs): the VNI and the VTEP's MAC."""

    vni: int | None
    mac: str

    def to_json(self) -> dict[str, Any]:
        return {"VNI": self.vni, "VtepMAC": self.mac}

    @classmethod
    def from_json(cls, raw: Any) -> VtepData | None:
        """None: the node publishes no VTEP for the family. Raises ValueError if the data is unreadable."""
        if not isinstance(raw, Mapping) or raw.get("VtepMAC") is None:
            return None
        vni = raw.get("VNI")
        if vni is not None and not isinstance(vni, int):
            raise ValueError(f"VNI {vni!r}")
        return cls(vni, canonical_mac(raw["VtepMAC"]))


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

    neighbours: dict[netaddr.IPAddress, str]
    fdb: dict[str, netaddr.IPAddress]


@dataclass(frozen=True)
class VXLANConfig(BackendConfig):
    vni: int = 1
    port: int = 8472
    direct_routing: bool = False

    @classmethod
    def fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        vni, port = lookup_ci(d, "VNI", 1), lookup_ci(d, "Port", 8472) or 8472
        if not isinstance(vni, int) or isinstance(vni, bool) or not 1 <= vni < 1 << 24:
            raise BackendConfigError(f"Backend.VNI {vni!r} must be an integer from 1 to 16777215")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise BackendConfigError(f"Backend.Port {port!r} must be a UDP port")
        direct = lookup_ci(d, "DirectRouting", False)
        if not isinstance(direct, bool):
            raise BackendConfigError("Backend.DirectRouting must be true or false")
        return {**super().fields(d), "vni": vni, "port": port, "direct_routing": direct}

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "VNI": self.vni, "Port": self.port, "DirectRouting": self.direct_routing}


def _owned(link: LinkFacts | None) -> bool:
    return link is not None and link.group == GROUP


@register
class VXLAN(Backend[VXLANConfig]):
    """The VTEPs and their entries are all rtnetlink on the wire format (weftlib.kernel.rtnl): one socket per
    setup or reconciliation, in the thread that runs it."""

    type = "vxlan"
    config_type = VXLANConfig

    def __init__(self, ipr: IPRoute, cfg: VXLANConfig, underlay: Underlay, published: Attrs | None = None) -> None:
        super().__init__(ipr, cfg, underlay, published)
        self.vteps: dict[int, Vtep] = {}
        with Rtnl() as rt:
            for v in (4, 6):
                name = f"weft.{cfg.vni}" if v == 4 else f"weft6.{cfg.vni}"
                link = rt.link(name)
                if v not in self.versions:
                    if link is not None and _owned(link):  # the family was turned off: its VTEP goes, its routes
                        log.info("IPv%d is off: removing %s", v, name)  # go at reconciliation
                        rt.del_link(link.index)
                    continue
                # Keep the MAC peers already know: the device's, else the one published with the lease.
                mac = link.mac if link is not None and _owned(link) else self._published_mac(published, v)
                local = underlay.address(v)
                assert local is not None
                self.vteps[v] = Vtep(v, name, mac or random_mac(), local)

    @staticmethod
    def _published_mac(published: Attrs | None, version: int) -> str | None:
        try:
            data = VtepData.from_json(published.data(version)) if published is not None else None
        except ValueError:
            return None
        return data.mac if data is not None else None

    def attrs(self) -> Attrs:
        def data(v: int) -> dict[str, Any] | None:
            vtep = self.vteps.get(v)
            return VtepData(self.cfg.vni, vtep.mac).to_json() if vtep is not None else None

        return Attrs(self.underlay.ip, self.type, data(4), self.underlay.ip6, data(6))

    def device_mtu(self, version: int) -> int:
        return (self.cfg.mtu or self.underlay.mtu) - OVERHEAD[version]

    def mtu(self) -> int:
        return min(self.device_mtu(v) for v in self.vteps)

    def _compatible(self, vtep: Vtep, link: LinkFacts) -> bool:
        info = attributes(link.info_data, 0)
        local = info.get(IFLA_VXLAN_LOCAL if vtep.version == 4 else IFLA_VXLAN_LOCAL6)
        port = info.get(IFLA_VXLAN_PORT)
        return (link.kind == "vxlan" and get_u32(info.get(IFLA_VXLAN_ID)) == self.cfg.vni
                and port is not None and BE16.unpack(port)[0] == self.cfg.port
                and local == vtep.local.packed
                and get_u32(info.get(IFLA_VXLAN_LINK)) == self.underlay.index
                and link.mac == vtep.mac)

    def setup(self, own: Lease) -> None:
        with Rtnl() as rt:
            for vtep in self.vteps.values():
                self._setup(rt, vtep, own.family_subnet(vtep.version))

    def _setup(self, rt: Rtnl, vtep: Vtep, subnet: netaddr.IPNetwork | None) -> None:
        link = rt.link(vtep.name)
        if link is not None and not _owned(link):
            raise BackendError(f"{vtep.name} exists and was not created by weft; not touching it")
        if link is not None and not self._compatible(vtep, link):
            log.warning("%s does not match the config; recreating it", vtep.name)
            rt.del_link(link.index)
            link = None
        mtu = self.device_mtu(vtep.version)
        if link is None:
            data = (nla_u32(IFLA_VXLAN_ID, self.cfg.vni) + nla_u32(IFLA_VXLAN_LINK, self.underlay.index)
                    + attribute(IFLA_VXLAN_LOCAL if vtep.version == 4 else IFLA_VXLAN_LOCAL6, vtep.local.packed)
                    + nla_u8(IFLA_VXLAN_LEARNING, 0) + attribute(IFLA_VXLAN_PORT, BE16.pack(self.cfg.port)))
            rt.new_link(nla_str(IFLA_IFNAME, vtep.name) + nla_mac(IFLA_ADDRESS, vtep.mac) + nla_u32(IFLA_MTU, mtu)
                        + nla_u32(IFLA_GROUP, GROUP) + nla_link_info("vxlan", data), create=True)
            log.info("created %s (VNI %d, port %d, local %s, MAC %s, MTU %d)", vtep.name, self.cfg.vni,
                     self.cfg.port, vtep.local, vtep.mac, mtu)
            link = rt.link(vtep.name)
            if link is None:
                raise BackendError(f"{vtep.name} vanished while being set up")
        vtep.index = link.index
        sysctl.write(f"/proc/sys/net/ipv6/conf/{vtep.name}/accept_ra", "0")
        if link.mtu != mtu:
            rt.new_link(nla_u32(IFLA_MTU, mtu), index=vtep.index)
        rt.new_link(b"", index=vtep.index, up=True)
        if subnet is None:
            return
        # The subnet's network address as a host address (/32, /128): a source address for host-to-pod traffic,
        # no broadcast routes. IPv6 without duplicate address detection, usable at once.
        plen = 32 if vtep.version == 4 else 128
        for _, address, prefixlen in rt.addresses(vtep.index, vtep.family, scope=RT_SCOPE_UNIVERSE):
            if netaddr.IPAddress(address) != subnet.network or prefixlen != plen:
                rt.del_addr(vtep.index, address, prefixlen, ok=(errno.EADDRNOTAVAIL,))
        rt.add_addr(vtep.index, str(subnet.network), plen, 0 if vtep.version == 4 else IFA_F_NODAD,
                    ok=(errno.EEXIST,))

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
                subnet, remote = p.family_subnet(v), p.attrs.public(v)
                if subnet is None or subnet in routes:
                    continue
                try:
                    data = VtepData.from_json(p.attrs.data(v))
                except ValueError as e:
                    log.warning("peer %s publishes unreadable IPv%d VTEP data (%s); skipping it", p.node, v, e)
                    reached = False
                    continue
                if data is None or remote is None:
                    log.warning("peer %s publishes no IPv%d VTEP (backend %s); skipping it", p.node, v,
                                p.attrs.backend_type)
                    reached = False
                    continue
                want[v].neighbours[subnet.network] = data.mac
                want[v].fdb[data.mac] = remote
                routes[subnet] = RouteSpec(subnet.network, vtep.index, onlink=True)
            if not reached:
                stats.unreachable.append(p.node)
        return want, routes

    def reconcile(self, own: Lease, peers: list[Lease]) -> Stats:
        stats = Stats(peers=len(peers))
        with Rtnl() as rt:
            for vtep in self.vteps.values():  # a VTEP deleted behind our back comes back; the diff refills it
                self._setup(rt, vtep, own.family_subnet(vtep.version))
            want, routes = self.desired(peers, stats)
            # Neighbours and FDB first: the kernel would ARP (or solicit) for the onlink gateway otherwise.
            for v, vtep in self.vteps.items():
                sync_neighbours(vtep.index, want[v].neighbours, (vtep.family,), stats, rt)
                sync_fdb(vtep.index, want[v].fdb, stats, rt)
            sync_routes(routes, stats, rt)
        return stats

    @classmethod
    def teardown(cls, ipr: IPRoute, args: argparse.Namespace) -> None:
        super().teardown(ipr, args)
        with Rtnl() as rt:
            for link in rt.links():
                if _owned(link) and link.kind == "vxlan":
                    rt.del_link(link.index)
