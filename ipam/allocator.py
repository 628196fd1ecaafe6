"""Round-robin allocation over a range set, as host-local does (backend/allocator/allocator.go)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from ipam.config import Range, RangeSet, rangeset_str
from ipam.reservations import Owner, Reservations
from weftlib.cni import errors
from weftlib.cni.errors import CniError
from weftlib.ipnet import IPAddress


def _candidates(rs: RangeSet, last: IPAddress | None) -> Iterator[tuple[IPAddress, Range]]:
    """Every address of the set once, starting after `last` if it is in the set, wrapping around."""
    start_r, start_ip = 0, int(rs[0].start)
    for i, r in enumerate(rs):
        if last is not None and last in r:
            start_r, start_ip = i, int(last) + 1
            if start_ip > int(r.end):
                start_r = (i + 1) % len(rs)
                start_ip = int(rs[start_r].start)
            break
    order = list(range(start_r, len(rs))) + list(range(0, start_r))
    for pos, ri in enumerate(order):
        r = rs[ri]
        lo = start_ip if pos == 0 else int(r.start)
        for n in range(lo, int(r.end) + 1):
            yield ipaddress.ip_address(n), r
    if start_ip > int(rs[start_r].start):  # the part of the first range before where we began
        r = rs[start_r]
        for n in range(int(r.start), start_ip):
            yield ipaddress.ip_address(n), r


def allocate(reservations: Reservations, taken: dict[IPAddress, Owner | None], rs: RangeSet, index: int,
             container_id: str, ifname: str, requested: list[IPAddress]) -> tuple[IPAddress, Range]:
    for ip, owner in taken.items():
        if owner is not None and owner.matches(container_id, ifname):
            for r in rs:
                if ip in r:
                    return ip, r  # a repeated ADD keeps its address
    for ip in requested:
        for r in rs:
            if ip in r:
                if ip == r.gateway:
                    raise CniError(errors.INVALID_CONFIG, f"requested ip {ip} is subnet's gateway")
                if ip in taken or not reservations.reserve(ip, container_id, ifname):
                    raise CniError(errors.INVALID_CONFIG,
                                   f"requested IP address {ip} is not available in range set {rangeset_str(rs)}")
                taken[ip] = Owner(container_id, ifname)
                return ip, r
    for ip, r in _candidates(rs, reservations.last_reserved(index)):
        if ip == r.gateway or ip in taken:
            continue
        if reservations.reserve(ip, container_id, ifname):
            reservations.set_last_reserved(index, ip)
            taken[ip] = Owner(container_id, ifname)
            return ip, r
    raise CniError(errors.TRY_AGAIN, f"no IP addresses available in range set: {rangeset_str(rs)}",
                   msg="IP range exhausted")


def free_count(taken: dict[IPAddress, Owner | None], rs: RangeSet) -> int:
    used = sum(1 for ip in taken for r in rs if ip in r and ip != r.gateway)
    return sum(r.size() for r in rs) - used
