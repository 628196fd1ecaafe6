"""The host-local IPAM config: range sets, routes, data directory and resolv.conf.

Defaults and messages follow the reference host-local
(plugins/ipam/host-local/backend/allocator/{config,range}.go).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weftlib import ipnet
from weftlib.cni import errors
from weftlib.cni.errors import CniError
from weftlib.cni.result import DNS, Route
from weftlib.cni.skel import Args
from weftlib.gojson import lookup_ci
from weftlib.ipnet import IPAddress, IPNetwork

DEFAULT_DATA_DIR = "/var/lib/cni/networks"


def _invalid(msg: str) -> CniError:
    return CniError(errors.INVALID_CONFIG, msg)


@dataclass(frozen=True)
class Range:
    subnet: IPNetwork
    start: IPAddress
    end: IPAddress
    gateway: IPAddress | None

    def __contains__(self, ip: object) -> bool:
        return (isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))
                and ip.version == self.subnet.version and int(self.start) <= int(ip) <= int(self.end))

    def size(self) -> int:
        return int(self.end) - int(self.start) + 1 - (1 if self.gateway in self else 0)

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"

    @classmethod
    def parse(cls, d: Any) -> Range:
        if not isinstance(d, dict):
            raise _invalid(f"range {d!r} must be an object")
        raw = _opt_str(d, "subnet")
        try:
            subnet = ipaddress.ip_network(raw, strict=False)
            given = ipaddress.ip_interface(raw).ip
        except ValueError as e:
            raise _invalid(f"invalid subnet {raw!r}: {e}") from None
        if given != subnet.network_address:
            raise _invalid(f"Network has host bits set. For a subnet mask of length {subnet.prefixlen} "
                           f"the network address is {subnet.network_address}")
        if subnet.num_addresses < 4:
            raise _invalid(f"Network {subnet} too small to allocate from")
        first = subnet.network_address + 1
        last = subnet.broadcast_address - 1 if subnet.version == 4 else subnet.broadcast_address
        start = _addr_in(d, "rangeStart", subnet) or first
        end = _addr_in(d, "rangeEnd", subnet) or last
        if not int(first) <= int(start) <= int(last) or not int(first) <= int(end) <= int(last):
            raise _invalid(f"range {start}-{end} must lie inside {subnet}, "
                           "excluding its network and broadcast addresses")
        if int(start) > int(end):
            raise _invalid(f"rangeStart {start} is after rangeEnd {end}")
        gw_raw = _opt_str(d, "gateway")
        try:
            gateway = ipaddress.ip_address(gw_raw) if gw_raw else ipnet.gateway(subnet)
        except ValueError as e:
            raise _invalid(f"invalid gateway {gw_raw!r}: {e}") from None
        if gateway.version != subnet.version:
            raise _invalid(f"gateway {gateway} is not in the family of {subnet}")
        return cls(subnet, start, end, gateway)

    def overlaps(self, other: Range) -> bool:
        return (self.subnet.version == other.subnet.version
                and int(self.start) <= int(other.end) and int(other.start) <= int(self.end))


def _opt_str(d: Mapping[str, Any], key: str) -> str:
    v = d.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _invalid(f"{key!r} must be a string, not {type(v).__name__}")
    return v


def _addr_in(d: Mapping[str, Any], key: str, subnet: IPNetwork) -> IPAddress | None:
    raw = _opt_str(d, key)
    if not raw:
        return None
    try:
        ip = ipaddress.ip_address(raw)
    except ValueError as e:
        raise _invalid(f"invalid {key} {raw!r}: {e}") from None
    if ip not in subnet:
        raise _invalid(f"{key} {ip} not in network {subnet}")
    return ip


RangeSet = tuple[Range, ...]


def rangeset_str(rs: RangeSet) -> str:
    return ",".join(str(r) for r in rs)


def parse_range_sets(raw: Any, where: str) -> list[RangeSet]:
    if not isinstance(raw, list):
        raise _invalid(f"{where} must be a list of range sets")
    sets: list[RangeSet] = []
    for i, rs_raw in enumerate(raw):
        if not isinstance(rs_raw, list) or not rs_raw:
            raise _invalid(f"{where}[{i}] must be a non-empty list of ranges")
        rs = tuple(Range.parse(r) for r in rs_raw)
        if len({r.subnet.version for r in rs}) > 1:
            raise _invalid(f"{where}[{i}]: mixed address families")
        for a in range(len(rs)):
            for b in range(a + 1, len(rs)):
                if rs[a].overlaps(rs[b]):
                    raise _invalid(f"{where}[{i}]: range {rs[a]} overlaps with {rs[b]}")
        sets.append(rs)
    return sets


@dataclass(frozen=True)
class IPAMConfig:
    type: str
    network: str
    range_sets: list[RangeSet]
    routes: list[Route] = field(default_factory=list)
    data_dir: str = DEFAULT_DATA_DIR
    dns: DNS = field(default_factory=DNS)
    requested: list[IPAddress] = field(default_factory=list)

    @classmethod
    def parse(cls, conf: Mapping[str, Any], args: Args | None = None) -> IPAMConfig:
        ipam = conf.get("ipam")
        if not isinstance(ipam, dict):
            raise _invalid("IPAM config missing 'ipam' key")
        sets: list[RangeSet] = []
        rc = conf.get("runtimeConfig")
        if isinstance(rc, dict) and (extra := lookup_ci(rc, "ipRanges")):
            sets += parse_range_sets(extra, "runtimeConfig.ipRanges")
        if ipam.get("subnet"):
            sets.append((Range.parse(ipam),))
        if "ranges" in ipam:
            sets += parse_range_sets(ipam["ranges"], "ranges")
        if not sets:
            raise _invalid("no IP ranges specified")
        for a in range(len(sets)):
            for b in range(a + 1, len(sets)):
                if any(x.overlaps(y) for x in sets[a] for y in sets[b]):
                    raise _invalid(f"range set {a} overlaps with {b}")
        routes_raw = ipam.get("routes") or []
        if not isinstance(routes_raw, list):
            raise _invalid("ipam 'routes' must be a list")
        try:
            routes = [Route.from_json(r) for r in routes_raw]
        except CniError as e:
            raise _invalid(f"ipam routes: {e.details}") from None
        data_dir = _opt_str(ipam, "dataDir") or DEFAULT_DATA_DIR
        if not os.path.isabs(data_dir) or "\0" in data_dir or ".." in data_dir.split("/"):
            raise _invalid(f"dataDir {data_dir[:80]!r} must be an absolute path without '..'")
        resolv = _opt_str(ipam, "resolvConf")
        dns = parse_resolv_conf(resolv) if resolv else DNS()
        return cls(type=_opt_str(ipam, "type"), network=str(conf["name"]), range_sets=sets,
                   routes=routes, data_dir=os.path.normpath(data_dir), dns=dns,
                   requested=_requested_ips(conf, args))


def _requested_ips(conf: Mapping[str, Any], args: Args | None) -> list[IPAddress]:
    """Static IPs: runtimeConfig.ips, then args.cni.ips, then CNI_ARGS IP= (CONVENTIONS.md)."""
    raw: list[Any] = []
    rc = conf.get("runtimeConfig")
    cni_args = conf.get("args", {}).get("cni", {}) if isinstance(conf.get("args"), dict) else {}
    if isinstance(rc, dict) and lookup_ci(rc, "ips"):
        raw = lookup_ci(rc, "ips")
    elif isinstance(cni_args, dict) and cni_args.get("ips"):
        raw = cni_args["ips"]
    elif args is not None and args.args.get("IP"):
        raw = args.args["IP"].split(",")
    if not isinstance(raw, list):
        raise _invalid("requested ips must be a list")
    out = []
    for item in raw:
        try:
            out.append(ipaddress.ip_interface(str(item)).ip)
        except ValueError as e:
            raise _invalid(f"invalid requested IP {item!r}: {e}") from None
    return out


def parse_resolv_conf(path: str) -> DNS:
    dns = DNS()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 16).splitlines()
    except OSError as e:
        raise _invalid(f"resolvConf {path!r}: {e.strerror}") from None
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        key, values = fields[0], fields[1:]
        if key == "nameserver":
            dns.nameservers.append(values[0])
        elif key == "domain":
            dns.domain = values[0]
        elif key == "search":
            dns.search.extend(values)
        elif key == "options":
            dns.options.extend(values)
    return dns
