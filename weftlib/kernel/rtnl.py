"""Synchronous rtnetlink over a plain socket, with pyroute2's message classes to encode and decode.

pyroute2 0.9's synchronous IPRoute runs an asyncio event loop for every call; on the per-pod
paths (CHECK, DEL, GC) that loop cost more than the kernel's work. Here a request is one send()
and the recv()s that answer it. The messages are pyroute2's own (ifinfmsg, ifaddrmsg, rtmsg), so
callers read them as they read IPRoute's (`link["index"]`, `link.get("IFLA_ADDRESS")`).
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
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

_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence number, port
_RECV = 1 << 17
IFF_UP, IFF_PROMISC = 0x1, 0x100
IFA_F_NODAD = 0x02  # linux/if_addr.h: an address without duplicate address detection
RTPROT_STATIC, RTN_UNICAST, RT_TABLE_MAIN = 4, 1, 254


class Rtnl:
    """One NETLINK_ROUTE socket, in the network namespace of the thread that opened it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self._seq = itertools.count(1)

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

    def routes(self, family: int) -> list[Any]:
        """Every route of `family`, in all tables."""
        msg = rtmsg()
        msg["family"] = family
        return self.request(msg, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, rtmsg)

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
