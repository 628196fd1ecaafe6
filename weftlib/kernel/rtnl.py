"""Synchronous rtnetlink over a plain socket, on the wire format.

pyroute2 0.9's synchronous IPRoute runs an asyncio event loop for every call, and its message
classes cost about 1 ms to decode a link: on the per-pod paths (ADD, CHECK, DEL, GC) that is
more than the kernel's work, and under a burst it holds the GIL. Here a request is one send() and
the recv()s that answer it, with struct headers and attributes as bytes, and the plugin does not
import pyroute2 at all. For weftd's thousands of peers, `batch` sends many requests per send()
without waiting for each answer.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from dataclasses import dataclass

from weftlib.kernel.netns import NetNS

# linux/netlink.h and linux/rtnetlink.h
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_ROOT, NLM_F_MATCH = 0x1, 0x2, 0x4, 0x100, 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30

SOL_NETLINK = 270

_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence number, port
_NLA = struct.Struct("=HH")  # attribute length, type
_ERRNO = struct.Struct("=i")
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
U32 = struct.Struct("=I")
U8 = struct.Struct("=B")
BE16 = struct.Struct("!H")
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_GROUP, IFLA_NET_NS_FD = 18, 20, 27, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
IFLA_BR_FORWARD_DELAY = 1
IFLA_BRPORT_MODE = 4  # hairpin
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
_RECV = 1 << 17
_RCVBUF = 4 << 20  # room for a batch's answers: the kernel drops answers that do not fit (ENOBUFS)
SO_RCVBUFFORCE = 33
NETLINK_CAP_ACK = 10  # error answers without a copy of the request
_BATCH_MAX = 256
IFF_UP, IFF_PROMISC = 0x1, 0x100
# linux/if_addr.h: IFA_F_NODAD, an address without duplicate address detection
IFA_F_NODAD, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x02, 0x08, 0x20, 0x40
RTPROT_STATIC, RTN_UNICAST, RT_TABLE_MAIN = 4, 1, 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255  # RT_SCOPE_NOWHERE in a delete: any scope
RTNH_F_ONLINK = 4
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80  # linux/neighbour.h
NTF_SELF = 0x02
# linux/if_link.h: a VXLAN device's IFLA_INFO_DATA
IFLA_VXLAN_ID, IFLA_VXLAN_LINK, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT, IFLA_VXLAN_LOCAL6 = \
    1, 3, 4, 7, 15, 17


def error(code: int) -> Exception:
    """The kernel's errno as pyroute2's NetlinkError, which weftd's callers catch (imported only on failure)."""
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError(code, os.strerror(code))


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

    def _exchange(self, kind: int, flags: int, body: bytes, out: list[bytes]) -> int:
        """Sends one request and receives until the kernel ends it (a dump's DONE, an ack, or a get's
        one answer), collecting the payloads of its messages in `out`; the kernel's errno, or 0."""
        seq = next(self._seq)
        self.sock.send(_HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body)
        while True:
            data = self.sock.recv(_RECV)
            off = 0
            while off + _HEADER.size <= len(data):
                length, mtype, mflags, mseq, _port = _HEADER.unpack_from(data, off)
                if length < _HEADER.size:
                    return errno.EBADMSG
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return 0
                    if mtype == NLMSG_ERROR:
                        return -_ERRNO.unpack_from(data, off + _HEADER.size)[0]
                    out.append(data[off + _HEADER.size:off + length])
                    if not mflags & NLM_F_MULTI:  # a get's single answer
                        return 0
                off += (length + 3) & ~3

    def request(self, kind: int, flags: int, body: bytes, ok: tuple[int, ...] = ()) -> list[bytes]:
        """One request (message type `kind`, payload `body`); the answers' payloads ([] for an ack).
        An errno in `ok` counts as success; any other raises NetlinkError."""
        out: list[bytes] = []
        code = self._exchange(kind, flags, body, out)
        if code and code not in ok:
            raise error(code)
        return out

    def _ack(self, kind: int, flags: int, body: bytes, ok: tuple[int, ...]) -> int:
        """A change acknowledged by the kernel: 0, or the errno if it is in `ok`; any other raises."""
        code = self._exchange(kind, flags | NLM_F_ACK, body, [])
        if code and code not in ok:
            raise error(code)
        return code

    def dump_raw(self, kind: int, body: bytes) -> list[bytes]:
        """A dump request (message type `kind`, family header `body`); each answer's payload as bytes."""
        return self.request(kind, NLM_F_REQUEST | NLM_F_DUMP, body)

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
                        raise error(errno.EBADMSG)
                    i = mseq - first
                    if 0 <= i < len(chunk):
                        if mtype == NLMSG_ERROR:
                            out[start + i] = -_ERRNO.unpack_from(data, off + _HEADER.size)[0]
                        else:
                            out[start + i] = data[off + _HEADER.size:off + length]
                        pending -= 1
                    off += (length + 3) & ~3
        return out

    def link(self, name: str | None = None, index: int = 0) -> LinkFacts | None:
        """The link called `name` (or with `index`), or None if there is none: one get."""
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + (nla_str(IFLA_IFNAME, name) if name else b"")
        answer = self.request(RTM_GETLINK, NLM_F_REQUEST, body, ok=(errno.ENODEV, errno.ENOENT))
        return link_facts(answer[0]) if answer else None

    def links(self) -> list[LinkFacts]:
        """Every link of the socket's namespace, one dump."""
        return [link_facts(b) for b in self.dump_raw(RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))]

    def addresses(self, index: int = 0, family: int = socket.AF_UNSPEC,
                  scope: int | None = None) -> list[tuple[int, str, int]]:
        """The addresses of the namespace (of link `index` only, if given; of `family`, of `scope`), one dump:
        (link index, address, prefix length). The kernel dumps a family's addresses of every link; the
        other filters are here."""
        out = []
        for body in self.dump_raw(RTM_GETADDR, IFADDRMSG.pack(family, 0, 0, 0, 0)):
            fam, prefixlen, _flags, got_scope, link = IFADDRMSG.unpack_from(body)
            a = attributes(body, IFADDRMSG.size)
            if IFA_ADDRESS in a and (not index or link == index) and (scope is None or got_scope == scope):
                out.append((link, socket.inet_ntop(fam, a[IFA_ADDRESS]), prefixlen))
        return out

    def del_link(self, index: int) -> bool:
        """Deletes link `index`; False if it was already gone."""
        return not self._ack(RTM_DELLINK, NLM_F_REQUEST, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0),
                             (errno.ENODEV,))

    def new_link(self, attrs: bytes, index: int = 0, up: bool = False, promisc: bool = False,
                 create: bool = False, ok: tuple[int, ...] = ()) -> int:
        """RTM_NEWLINK with encoded attributes `attrs`: creates a link (create=True: EEXIST if it is there)
        or changes link `index`. `up` and `promisc` set those flags; the others are left as they are.
        0, or the errno if it is in `ok`."""
        flags = (IFF_UP if up else 0) | (IFF_PROMISC if promisc else 0)
        nl_flags = NLM_F_REQUEST | (NLM_F_CREATE | NLM_F_EXCL if create else 0)
        return self._ack(RTM_NEWLINK, nl_flags, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, flags) + attrs, ok)

    def _addr(self, kind: int, flags: int, index: int, address: str, prefixlen: int, addr_flags: int,
              ok: tuple[int, ...]) -> int:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        value = socket.inet_pton(family, address)
        attrs = attribute(IFA_ADDRESS, value) + (attribute(IFA_LOCAL, value) if family == socket.AF_INET else b"")
        return self._ack(kind, flags, IFADDRMSG.pack(family, prefixlen, addr_flags, 0, index) + attrs, ok)

    def add_addr(self, index: int, address: str, prefixlen: int, addr_flags: int = 0,
                 ok: tuple[int, ...] = ()) -> int:
        """Adds an address (`addr_flags`: IFA_F_* such as IFA_F_NODAD); EEXIST if it is there."""
        return self._addr(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, index, address, prefixlen,
                          addr_flags, ok)

    def del_addr(self, index: int, address: str, prefixlen: int, ok: tuple[int, ...] = ()) -> int:
        return self._addr(RTM_DELADDR, NLM_F_REQUEST, index, address, prefixlen, 0, ok)

    def replace_route(self, dst: str, dst_len: int, oif: int, gateway: str | None = None, scope: int = 0,
                      priority: int | None = None, table: int | None = None) -> None:
        """Adds or replaces a unicast route, proto static (as `ip route replace` makes it)."""
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        main = table if table is not None and table < 256 else RT_TABLE_MAIN
        body = RTMSG.pack(family, dst_len, 0, 0, main, RTPROT_STATIC, scope, RTN_UNICAST, 0) + nla_u32(RTA_OIF, oif)
        if dst_len:
            body += attribute(RTA_DST, socket.inet_pton(family, dst))
        if gateway is not None:
            body += attribute(RTA_GATEWAY, socket.inet_pton(family, gateway))
        if priority:
            body += nla_u32(RTA_PRIORITY, priority)
        if table is not None:
            body += nla_u32(RTA_TABLE, table)
        self._ack(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE, body, ())


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


def nla_str(kind: int, value: str) -> bytes:
    return attribute(kind, value.encode() + b"\0")


def nla_u32(kind: int, value: int) -> bytes:
    return attribute(kind, U32.pack(value))


def nla_u8(kind: int, value: int) -> bytes:
    return attribute(kind, U8.pack(value))


def nla_mac(kind: int, mac: str) -> bytes:
    return attribute(kind, bytes.fromhex(mac.replace(":", "")))


def nla_nest(kind: int, *children: bytes) -> bytes:
    return attribute(kind, b"".join(children))


def nla_link_info(kind: str, data: bytes = b"", slave_kind: str = "", slave_data: bytes = b"") -> bytes:
    """IFLA_LINKINFO: the link's kind and its kind's settings, and its settings as a port of a master."""
    info = nla_str(IFLA_INFO_KIND, kind) if kind else b""
    if data:
        info += nla_nest(IFLA_INFO_DATA, data)
    if slave_kind:
        info += nla_str(IFLA_INFO_SLAVE_KIND, slave_kind) + nla_nest(IFLA_INFO_SLAVE_DATA, slave_data)
    return nla_nest(IFLA_LINKINFO, info)


def veth_peer(attrs: bytes) -> bytes:
    """VETH_INFO_PEER: the peer's own ifinfomsg and attributes."""
    return nla_nest(VETH_INFO_PEER, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attrs)




@dataclass(frozen=True)
class LinkFacts:
    """What Weft reads of a link, from the wire format."""

    index: int
    name: str
    kind: str | None
    mac: str | None
    peer: int | None  # IFLA_LINK: a veth's peer index (in the peer's namespace)
    master: int | None
    group: int
    flags: int
    alias: str | None
    mtu: int | None = None
    info_data: bytes = b""  # IFLA_INFO_DATA: the kind's settings, encoded (rtnl.attributes(info_data, 0) reads them)


def link_facts(body: bytes) -> LinkFacts:
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(body)
    a = attributes(body, IFINFOMSG.size)
    info = attributes(a[IFLA_LINKINFO], 0) if IFLA_LINKINFO in a else {}
    kind = info.get(IFLA_INFO_KIND)
    mac = a.get(IFLA_ADDRESS)
    alias = a.get(IFLA_IFALIAS)
    return LinkFacts(index, _str(a.get(IFLA_IFNAME)) or "", _str(kind), mac.hex(":") if mac else None,
                     get_u32(a.get(IFLA_LINK)), get_u32(a.get(IFLA_MASTER)), get_u32(a.get(IFLA_GROUP)) or 0, flags,
                     _str(alias), get_u32(a.get(IFLA_MTU)), info.get(IFLA_INFO_DATA, b""))


def get_u32(value: bytes | None) -> int | None:
    """A u32 attribute's value; None if it is absent."""
    return None if value is None or len(value) != 4 else U32.unpack(value)[0]


def _str(value: bytes | None) -> str | None:
    return None if value is None else value.rstrip(b"\0").decode(errors="replace")


def unicast_routes(rt: Rtnl) -> list[tuple[str, int, str | None]]:
    """The unicast routes of every table of both families, one dump: (destination, prefix length, gateway)."""
    out = []
    for body in rt.dump_raw(RTM_GETROUTE, RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)):
        family, dst_len, _src, _tos, _table, _proto, _scope, kind, _flags = RTMSG.unpack_from(body)
        if family not in (socket.AF_INET, socket.AF_INET6) or kind != RTN_UNICAST:
            continue
        a = attributes(body, RTMSG.size)
        dst = a.get(RTA_DST) or bytes(4 if family == socket.AF_INET else 16)
        gw = a.get(RTA_GATEWAY)
        out.append((socket.inet_ntop(family, dst), dst_len, socket.inet_ntop(family, gw) if gw else None))
    return out
