"""A node's subnet lease and what peers need to reach it (Flannel's LeaseAttrs, plus the node name).

A lease carries one subnet per enabled family (`subnet`: IPv4, `ipv6_subnet`: IPv6; either is None
when its family is off), and per family the address peers reach the node at and the backend's data
for it: Flannel's PublicIP/BackendData and PublicIPv6/BackendV6Data. The backend data is JSON that
only the backend named by BackendType reads (as Flannel keeps it raw); the lease and the stores
carry it as it came.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

import netaddr


class LeaseError(ValueError):
    pass


@dataclass(frozen=True)
class Attrs:
    """What a node publishes: where to reach it, per family, and its backend's data for that family."""

    public_ip: netaddr.IPAddress | None  # None: the node has no IPv4 underlay (IPv6-only)
    backend_type: str
    backend_data: Any = None  # a JSON object (None: none): the backend's, for IPv4
    public_ipv6: netaddr.IPAddress | None = None
    backend_v6_data: Any = None  # the backend's, for IPv6

    def public(self, version: int) -> netaddr.IPAddress | None:
        return self.public_ip if version == 4 else self.public_ipv6

    def data(self, version: int) -> Any:
        return self.backend_data if version == 4 else self.backend_v6_data


# weftd parses every peer's lease at each change; at 5,000 peers netaddr's string parsers cost a
# second. The plain spellings (all that Weft and Flannel write) take a fast path to the same
# objects; anything else goes through netaddr, which accepts or refuses it.


def _fast_ip(raw: str) -> netaddr.IPAddress | None:
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            return netaddr.IPAddress(int.from_bytes(socket.inet_pton(family, raw)), version)
        except OSError:
            continue
    return None


def _net(raw: Any) -> netaddr.IPNetwork | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        addr, slash, plen = raw.partition("/")
        ip = _fast_ip(addr) if slash and plen.isascii() and plen.isdigit() else None
        bits = 32 if ip is not None and ip.version == 4 else 128
        if ip is not None and int(plen) <= bits:
            mask = ((1 << bits) - 1) ^ ((1 << (bits - int(plen))) - 1)
            return netaddr.IPNetwork((int(ip) & mask, int(plen)), version=ip.version)  # .cidr: host bits cleared
    return netaddr.IPNetwork(raw).cidr


def _ip(raw: Any) -> netaddr.IPAddress | None:
    if raw is None:
        return None
    ip = _fast_ip(raw) if isinstance(raw, str) else None
    return ip if ip is not None else netaddr.IPAddress(raw)


@dataclass(frozen=True)
class Lease:
    node: str
    subnet: netaddr.IPNetwork | None  # IPv4; None in an IPv6-only cluster
    attrs: Attrs
    ipv6_subnet: netaddr.IPNetwork | None = None

    @property
    def public_ip(self) -> netaddr.IPAddress | None:
        return self.attrs.public_ip

    @property
    def public_ipv6(self) -> netaddr.IPAddress | None:
        return self.attrs.public_ipv6

    @property
    def subnets(self) -> list[netaddr.IPNetwork]:
        """The lease's subnets, IPv4 first."""
        return [s for s in (self.subnet, self.ipv6_subnet) if s is not None]

    def family_subnet(self, version: int) -> netaddr.IPNetwork | None:
        return self.subnet if version == 4 else self.ipv6_subnet

    def to_json(self) -> dict[str, Any]:
        a = self.attrs
        out: dict[str, Any] = {"Node": self.node, "BackendType": a.backend_type}
        if self.subnet is not None:
            out["Subnet"] = str(self.subnet)
        if self.ipv6_subnet is not None:
            out["IPv6Subnet"] = str(self.ipv6_subnet)
        # Flannel's LeaseAttrs: PublicIP always present, PublicIPv6 a pointer (null), the data omitempty.
        out["PublicIP"] = None if a.public_ip is None else str(a.public_ip)
        out["PublicIPv6"] = None if a.public_ipv6 is None else str(a.public_ipv6)
        out["BackendData"] = a.backend_data
        if a.backend_v6_data is not None:
            out["BackendV6Data"] = a.backend_v6_data
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, d: Any, subnet: str | None = None, ipv6_subnet: str | None = None) -> Lease:
        """`subnet`, `ipv6_subnet`: where the store keeps them outside the value (etcd's key, a Node's podCIDRs);
        when either is given, both come from the arguments."""
        if not isinstance(d, dict):
            raise LeaseError(f"lease must be an object, not {type(d).__name__}")
        try:
            if subnet is not None or ipv6_subnet is not None:
                net, net6 = _net(subnet), _net(ipv6_subnet)
            else:
                net, net6 = _net(d.get("Subnet")), _net(d.get("IPv6Subnet"))
            if net is None and net6 is None:
                raise ValueError("no Subnet and no IPv6Subnet")
            if (net is not None and net.version != 4) or (net6 is not None and net6.version != 6):
                raise ValueError("Subnet must be IPv4 and IPv6Subnet IPv6")
            ip, ip6 = _ip(d.get("PublicIP")), _ip(d.get("PublicIPv6"))
            if ip is None and ip6 is None:
                raise ValueError("no PublicIP and no PublicIPv6")
            if (ip is not None and ip.version != 4) or (ip6 is not None and ip6.version != 6):
                raise ValueError("PublicIP must be IPv4 and PublicIPv6 IPv6")
            node = d.get("Node") or str(ip or ip6)
            backend = d.get("BackendType") or "host-gw"
            data, data6 = d.get("BackendData") or None, d.get("BackendV6Data") or None
        except (KeyError, TypeError, AttributeError, ValueError, netaddr.AddrFormatError) as e:
            raise LeaseError(f"unreadable lease {str(d)[:200]}: {e}") from None
        if not isinstance(node, str) or not isinstance(backend, str):
            raise LeaseError(f"unreadable lease {str(d)[:200]}")
        for raw in (data, data6):
            if raw is not None and not isinstance(raw, dict):
                raise LeaseError(f"unreadable lease {str(d)[:200]}: backend data must be a JSON object")
        return cls(node, net, Attrs(ip, backend, data, ip6, data6), net6)
