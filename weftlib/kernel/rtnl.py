"""Synchronous rtnetlink over a plain socket, with pyroute2's message classes to encode and decode.

pyroute2 0.9's synchronous IPRoute runs an asyncio event loop for every call; on the per-pod
paths (CHECK, DEL, GC) that loop cost more than the kernel's work. Here a request is one send()
and the recv()s that answer it. The messages are pyroute2's own (ifinfmsg, ifaddrmsg, rtmsg), so
callers read them as they read IPRoute's (`link["index"]`, `link.get("IFLA_ADDRESS")`).

For thousands of entries (weftd's peers) even pyroute2's message classes cost more than the
kernel: `dump_raw` and `batch` work on the wire format directly (struct headers, attributes
as bytes), and `batch` sends many requests per send() without waiting for each answer.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from weftlib.kernel.netns import NetNS

SOL_NETLINK = 270

_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence number, port
_NLA = struct.Struct("=HH")  # attribute length, type
_ERRNO = struct.Struct("=i")
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
U32 = struct.Struct("=I")
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
_RECV = 1 << 17
_RCVBUF = 4 << 20  # room for a batch's answers: the kernel drops answers that do not fit (ENOBUFS)
SO_RCVBUFFORCE = 33
NETLINK_CAP_ACK = 10  # error answers without a copy of the request
_BATCH_MAX = 256
IFF_UP, IFF_PROMISC = 0x1, 0x100
IFA_F_NODAD = 0x02  # linux/if_addr.h: an address without duplicate address detection
RTPROT_STATIC, RTN_UNICAST, RT_TABLE_MAIN = 4, 1, 254


class Rtnl:
    """One NETLINK_ROUTE socket, in the network namespace of the thread that opened it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self._seq = itertools.count(1)
        self._batch_size = 0

    def _bigger_buffer(self) -> int:
        """Asks for a receive buffer big enough for a batch's answers; how many answers fit in the one we got."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)  # CAP_NET_ADMIN: beyond rmem_max
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError:
            pass
        # An answer to a get can take a whole page of the buffer (the kernel allocates NLMSG_GOODSIZE).
        return max(4, min(_BATCH_MAX, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 8192))

    @classmethod
    def open_in(cls, ns: NetNS) -> Rtnl:
        """A socket bound to `ns`; it stays there after this thread returns home."""
        with ns.entered():
            return cls()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, msg: Any, kind: int, flags: int, reply: type | None = None) -> list[Any]:
        """Sends `msg` as message type `kind`; the decoded replies (of class `reply`), or [] for an ack.

        Raises NetlinkError with the kernel's errno.
        """
        seq = next(self._seq)
        msg["header"]["type"] = kind
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = seq
        msg.encode()
        self.sock.send(msg.data)
        out: list[Any] = []
        while True:
            data = self.sock.recv(_RECV)
            off = 0
            while off + _HEADER.size <= len(data):
                length, mtype, _flags, mseq, _port = _HEADER.unpack_from(data, off)
                if length < _HEADER.size:
                    raise NetlinkError(errno.EBADMSG, "truncated netlink message")
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return out
                    if mtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + _HEADER.size)[0]
                        if code:
                            raise NetlinkError(code)
                        return out
                    if reply is not None:
                        m = reply(data[off:off + length])
                        m.decode()
                        out.append(m)
                off += (length + 3) & ~3
            if not flags & NLM_F_DUMP and out:
                return out

    def dump_raw(self, kind: int, body: bytes) -> list[bytes]:
        """A dump request (message type `kind`, family header `body`); each answer's payload as bytes."""
        seq = next(self._seq)
        self.sock.send(_HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        out: list[bytes] = []
        while True:
            data = self.sock.recv(_RECV)
            off = 0
            while off + _HEADER.size <= len(data):
                length, mtype, _flags, mseq, _port = _HEADER.unpack_from(data, off)
                if length < _HEADER.size:
                    raise NetlinkError(errno.EBADMSG, "truncated netlink message")
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return out
                    if mtype == NLMSG_ERROR:
                        code = -_ERRNO.unpack_from(data, off + _HEADER.size)[0]
                        if code:
                            raise NetlinkError(code)
                        return out
                    out.append(data[off + _HEADER.size:off + length])
                off += (length + 3) & ~3

    def batch(self, requests: list[tuple[int, int, bytes]]) -> list[int | bytes]:
        """Sends each (message type, flags, payload) without waiting for the one before to be answered.

        Each request must draw exactly one answer: NLM_F_ACK for a change, a plain get for a get.
        Returns, per request in order, 0 (acknowledged), the kernel's errno, or the answer's payload.
        The kernel handles the requests of one send() in order, one after the other.
        """
        if len(requests) > 4 and not self._batch_size:  # a few answers fit any buffer
            self._batch_size = self._bigger_buffer()
        size = self._batch_size or 4
        out: list[int | bytes] = [0] * len(requests)
        for start in range(0, len(requests), size):
            chunk = requests[start:start + size]
            first = next(self._seq)
            self._seq = itertools.count(first + len(chunk))
            buf = bytearray()
            for i, (kind, flags, body) in enumerate(chunk):
                buf += _HEADER.pack(_HEADER.size + len(body), kind, flags, first + i, 0)
                buf += body
            self.sock.send(buf)
            pending = len(chunk)
            while pending:
                data = self.sock.recv(_RECV)
                off = 0
                while off + _HEADER.size <= len(data):
                    length, mtype, _flags, mseq, _port = _HEADER.unpack_from(data, off)
                    if length < _HEADER.size:
                        raise NetlinkError(errno.EBADMSG, "truncated netlink message")
                    i = mseq - first
                    if 0 <= i < len(chunk):
                        if mtype == NLMSG_ERROR:
                            out[start + i] = -_ERRNO.unpack_from(data, off + _HEADER.size)[0]
                        else:
                            out[start + i] = data[off + _HEADER.size:off + length]
                        pending -= 1
                    off += (length + 3) & ~3
        return out

    def link(self, name: str | None = None, index: int = 0) -> Any:
        """The link called `name` (or with `index`), or None if there is none."""
        msg = ifinfmsg()
        msg["index"] = index
        if name is not None:
            msg["attrs"] = [("IFLA_IFNAME", name)]
        try:
            return self.request(msg, RTM_GETLINK, NLM_F_REQUEST, ifinfmsg)[0]
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise

    def links(self) -> list[Any]:
        return self.request(ifinfmsg(), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, ifinfmsg)

    def addrs(self, index: int) -> list[Any]:
        """The addresses on link `index` (the kernel dumps them all; the filter is here)."""
        return [a for a in self.request(ifaddrmsg(), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, ifaddrmsg)
                if a["index"] == index]

    def del_link(self, index: int) -> bool:
        """Deletes link `index`; False if it was already gone."""
        msg = ifinfmsg()
        msg["index"] = index
        try:
            self.request(msg, RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise
        return True

    def new_link(self, attrs: list[tuple[str, Any]], index: int = 0, up: bool = False, promisc: bool = False,
                 create: bool = False) -> None:
        """RTM_NEWLINK: creates a link (create=True: EEXIST if it is there) or changes link `index`.
        `up` and `promisc` set those flags; the others are left as they are."""
        msg = ifinfmsg()
        msg["index"] = index
        msg["flags"] = (IFF_UP if up else 0) | (IFF_PROMISC if promisc else 0)
        msg["change"] = msg["flags"]
        msg["attrs"] = attrs
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if create else 0)
        self.request(msg, RTM_NEWLINK, flags)

    def _addr(self, kind: int, flags: int, index: int, address: str, prefixlen: int, addr_flags: int = 0) -> None:
        msg = ifaddrmsg()
        msg["family"] = socket.AF_INET6 if ":" in address else socket.AF_INET
        msg["prefixlen"] = prefixlen
        msg["flags"] = addr_flags
        msg["index"] = index
        msg["attrs"] = [("IFA_ADDRESS", address)] + ([("IFA_LOCAL", address)] if ":" not in address else [])
        self.request(msg, kind, flags)

    def add_addr(self, index: int, address: str, prefixlen: int, addr_flags: int = 0) -> None:
        """Adds an address (`addr_flags`: IFA_F_* such as IFA_F_NODAD); EEXIST if it is there."""
        self._addr(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, index, address, prefixlen,
                   addr_flags)

    def del_addr(self, index: int, address: str, prefixlen: int) -> None:
        self._addr(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, index, address, prefixlen)

    def replace_route(self, dst: str, dst_len: int, oif: int, gateway: str | None = None, scope: int = 0,
                      priority: int | None = None, table: int | None = None) -> None:
        """Adds or replaces a unicast route, proto static (as `ip route replace` and IPRoute make it)."""
        msg = rtmsg()
        msg["family"] = socket.AF_INET6 if ":" in dst else socket.AF_INET
        msg["dst_len"] = dst_len
        msg["table"] = table if table is not None and table < 256 else RT_TABLE_MAIN
        msg["proto"] = RTPROT_STATIC
        msg["scope"] = scope
        msg["type"] = RTN_UNICAST
        attrs: list[tuple[str, Any]] = [("RTA_OIF", oif)]
        if dst_len:
            attrs.append(("RTA_DST", dst))
        if gateway is not None:
            attrs.append(("RTA_GATEWAY", gateway))
        if priority:
            attrs.append(("RTA_PRIORITY", priority))
        if table is not None:
            attrs.append(("RTA_TABLE", table))
        msg["attrs"] = attrs
        self.request(msg, RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)


def attributes(data: bytes, off: int) -> dict[int, bytes]:
    """The netlink attributes of a message payload from `off` on, by type (nested ones left encoded)."""
    out = {}
    end = len(data)
    while off + 4 <= end:
        length, kind = _NLA.unpack_from(data, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return out


def attribute(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded."""
    length = 4 + len(value)
    return _NLA.pack(length, kind) + value + bytes(-length & 3)


IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_GROUP = 1, 3, 5, 10, 18, 27
IFLA_INFO_KIND = 1
IFA_ADDRESS = 1
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index


@dataclass(frozen=True)
class LinkFacts:
    """What CHECK reads of a link, from the wire format (no pyroute2 object: a link decodes in ~1 ms)."""

    index: int
    name: str
    kind: str | None
    mac: str | None
    peer: int | None  # IFLA_LINK: a veth's peer index (in the peer's namespace)
    master: int | None
    group: int


def link_facts(body: bytes) -> LinkFacts:
    _family, _type, index, _flags, _change = IFINFOMSG.unpack_from(body)
    a = attributes(body, IFINFOMSG.size)
    info = attributes(a[IFLA_LINKINFO], 0) if IFLA_LINKINFO in a else {}
    kind = info.get(IFLA_INFO_KIND)
    mac = a.get(IFLA_ADDRESS)
    return LinkFacts(index, a.get(IFLA_IFNAME, b"\0").rstrip(b"\0").decode(errors="replace"),
                     kind.rstrip(b"\0").decode() if kind else None, mac.hex(":") if mac else None,
                     _u32(a.get(IFLA_LINK)), _u32(a.get(IFLA_MASTER)), _u32(a.get(IFLA_GROUP)) or 0)


def _u32(value: bytes | None) -> int | None:
    return None if value is None or len(value) != 4 else U32.unpack(value)[0]


def links_facts(rt: Rtnl) -> list[LinkFacts]:
    """Every link of the socket's namespace, one dump."""
    return [link_facts(b) for b in rt.dump_raw(RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))]


def link_facts_by_name(rt: Rtnl, name: str) -> LinkFacts | None:
    """The link called `name`, or None: one get."""
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attribute(IFLA_IFNAME, name.encode() + b"\0")
    answer = rt.batch([(RTM_GETLINK, NLM_F_REQUEST, body)])[0]
    if isinstance(answer, int):
        if answer in (errno.ENODEV, errno.ENOENT):
            return None
        raise NetlinkError(answer)
    return link_facts(answer)


def addresses(rt: Rtnl) -> list[tuple[int, str, int]]:
    """Every address of the socket's namespace, one dump: (link index, address, prefix length)."""
    out = []
    for body in rt.dump_raw(RTM_GETADDR, IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(body)
        a = attributes(body, IFADDRMSG.size)
        if IFA_ADDRESS in a:
            out.append((index, socket.inet_ntop(family, a[IFA_ADDRESS]), prefixlen))
    return out


def unicast_routes(rt: Rtnl) -> list[tuple[str, int, str | None]]:
    """The unicast routes of every table of both families, one dump: (destination, prefix length, gateway)."""
    out = []
    for body in rt.dump_raw(RTM_GETROUTE, RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)):
        family, dst_len, _src, _tos, _table, _proto, _scope, kind, _flags = RTMSG.unpack_from(body)
        if family not in (socket.AF_INET, socket.AF_INET6) or kind != 1:  # RTN_UNICAST
            continue
        a = attributes(body, RTMSG.size)
        dst = a.get(RTA_DST) or bytes(4 if family == socket.AF_INET else 16)
        gw = a.get(RTA_GATEWAY)
        out.append((socket.inet_ntop(family, dst), dst_len, socket.inet_ntop(family, gw) if gw else None))
    return out
