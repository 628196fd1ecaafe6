"""The underlay: the interface peers reach this node through, found once at start (Flannel's
ExternalInterface), by name, by an address it holds, or by the default route."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import netaddr
from pyroute2 import IPRoute

from weftd.backend.errors import BackendError
from weftlib.kernel.rtnl import IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE, RT_SCOPE_UNIVERSE, RT_TABLE_MAIN


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


def _global_addresses(ipr: IPRoute, version: int, index: int | None = None) -> list[tuple[int, str]]:
    """(interface index, address) of usable global addresses: no link-local, no failed or deprecated IPv6.
    Addresses still in duplicate address detection come last: one of them is picked only if there is no
    other, since it may yet fail."""
    out = []
    kw = {} if index is None else {"index": index}
    for a in ipr.get_addr(family=_AF[version], **kw):
        flags = a.get("IFA_FLAGS") or a["flags"]
        if a["scope"] == RT_SCOPE_UNIVERSE and not flags & (IFA_F_DADFAILED | IFA_F_DEPRECATED):
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
            for r in ipr.get_routes(family=_AF[v], table=RT_TABLE_MAIN):
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
