"""The kernel's forwarding entries made exactly what the backends want: routes, neighbours and FDB entries.

Each kind is one dump, then only the differences, sent in batches on the wire format (weftlib.kernel.rtnl):
at thousands of peers, one request per entry would cost more than the rest of a reconciliation.
Addresses arrive as netaddr objects and go to the wire packed.

Ownership: routes Weft installs carry route protocol PROTO; every neighbour and FDB entry on Weft's own
VTEP is Weft's. Only those are ever deleted.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import netaddr

from weftd.backend.errors import BackendError
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
    NTF_SELF,
    NUD_NOARP,
    NUD_PERMANENT,
    RT_SCOPE_LINK,
    RT_SCOPE_NOWHERE,
    RT_TABLE_MAIN,
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
    RTN_UNICAST,
    RTNH_F_ONLINK,
    U32,
    Rtnl,
    attribute,
    attributes,
    get_u32,
)

PROTO = 119  # route protocol number marking Weft's routes (`ip route show proto 119`)


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
    gateway: netaddr.IPAddress | None  # None: a device route (scope link), as through a WireGuard device
    oif: int
    onlink: bool = False


def _family(packed: bytes) -> int:
    return socket.AF_INET if len(packed) == 4 else socket.AF_INET6


def _text(packed: bytes) -> str:
    return socket.inet_ntop(_family(packed), packed)


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


@contextmanager
def _socket(rt: Rtnl | None) -> Iterator[Rtnl]:
    """`rt`, or a socket of this call's own (each thread opens its own)."""
    if rt is not None:
        yield rt
        return
    with Rtnl() as own:
        yield own


def on_link(ips: list[netaddr.IPAddress], ifindex: int, rt: Rtnl | None = None) -> set[netaddr.IPAddress]:
    """Those of `ips` reached directly through link `ifindex`, with no router between (one batch of route gets)."""
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
            if RTA_GATEWAY not in a and get_u32(a.get(RTA_OIF)) == ifindex:
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
        gateway = spec.gateway.packed if spec.gateway is not None else None
        want[(dst.network.packed, dst.prefixlen)] = (gateway, spec.oif, spec.onlink)
    with _socket(rt) as sock:
        have: dict[tuple[bytes, int], tuple[bytes | None, int | None, bool]] = {}
        for body in sock.dump_raw(RTM_GETROUTE, RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)):
            family, dst_len, _src, _tos, table, proto, _scope, _kind, flags = RTMSG.unpack_from(body)
            if proto != PROTO or table != RT_TABLE_MAIN or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            a = attributes(body, RTMSG.size)
            dst = a.get(RTA_DST) or bytes(4 if family == socket.AF_INET else 16)
            have[(dst, dst_len)] = (a.get(RTA_GATEWAY), get_u32(a.get(RTA_OIF)), bool(flags & RTNH_F_ONLINK))
        requests: list[tuple[int, int, bytes]] = []
        what: list[tuple[Any, ...]] = []
        for dst, dst_len in have.keys() - want.keys():
            body = RTMSG.pack(_family(dst), dst_len, 0, 0, RT_TABLE_MAIN, PROTO, RT_SCOPE_NOWHERE, 0, 0)
            requests.append((RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, body + attribute(RTA_DST, dst)))
            what.append((dst, dst_len, None))
        for key, (gateway, oif, onlink) in want.items():
            if have.get(key) == (gateway, oif, onlink):
                continue
            dst, dst_len = key
            body = RTMSG.pack(_family(dst), dst_len, 0, 0, RT_TABLE_MAIN, PROTO,
                              RT_SCOPE_LINK if gateway is None else 0, RTN_UNICAST, RTNH_F_ONLINK if onlink else 0)
            body += attribute(RTA_DST, dst) + attribute(RTA_OIF, U32.pack(oif))
            if gateway is not None:
                body += attribute(RTA_GATEWAY, gateway)
            requests.append((RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body))
            what.append((dst, dst_len, _text(gateway) if gateway else oif))
        _apply(sock, requests, what, _describe_route, (errno.ESRCH,), stats)
    stats.routes = len(desired)


def sync_neighbours(ifindex: int, desired: dict[netaddr.IPAddress, str], families: tuple[int, ...], stats: Stats,
                    rt: Rtnl | None = None) -> None:
    """Makes the neighbours of `families` on link `ifindex` exactly `desired` (IP: MAC), all permanent.

    For a device that is Weft's own: every neighbour of those families on it is Weft's, but for
    the kernel's NOARP entries.
    """
    want = {ip.packed: _mac_bytes(mac) for ip, mac in desired.items()}
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


def sync_fdb(ifindex: int, desired: dict[str, netaddr.IPAddress], stats: Stats, rt: Rtnl | None = None) -> None:
    """Makes the remote FDB entries of VXLAN device `ifindex` exactly `desired` (MAC: remote IP), one remote each."""
    want = {_mac_bytes(mac): ip.packed for mac, ip in desired.items()}
    with _socket(rt) as sock:
        have: dict[bytes, list[bytes]] = {}
        # An ifinfomsg header: the kernel then dumps only port `ifindex`.
        for body in sock.dump_raw(RTM_GETNEIGH, IFINFOMSG.pack(socket.AF_BRIDGE, 0, ifindex, 0, 0)):
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
                    body = NDMSG.pack(socket.AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0)
                    body += attribute(NDA_LLADDR, mac) + attribute(NDA_DST, dst)
                    requests.append((RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, body))
                    what.append((mac, dst, False))
        for mac, dst in want.items():
            if dst in have.get(mac, ()):  # its other remotes, if any, are deleted above
                continue
            body = NDMSG.pack(socket.AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0)
            body += attribute(NDA_LLADDR, mac) + attribute(NDA_DST, dst)
            requests.append((RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body))
            what.append((mac, dst, True))
        _apply(sock, requests, what, _describe_fdb, (errno.ENOENT,), stats)
    stats.fdb += len(desired)
