"""nftables set and map elements added and deleted over netlink, as one nf_tables transaction (a batch), without
libnftables.

libnftables reads the ruleset's sets (and every element of its interval sets) from the kernel before it runs any
command, to check the command against them: with a thousand sets that is about 5 ms of CPU for a one-element
change. Element changes of known sets need none of it: their keys are encoded here from nft's own element text
(`10.0.0.1`, `10.0.0.1 . tcp . 80`, `"veth0" . fd00::1`, `0x...` for a 128-bit raw field, `10.0.0.1 : jump
chain` in a verdict map) and the kernel checks them. Sockets are kept per network namespace (closing one makes
the kernel wait for the release of what its transactions deleted), as nft's contexts are.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from weftlib.kernel.rtnl import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR, attribute, nla_nest, nla_str

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_JUMP = -3
FAMILIES = {"ip": 2, "inet": 1, "bridge": 7, "ip6": 10}
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
IFNAMSIZ = 16
_HEADER = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, resource id (big-endian)
_CHUNK = 200  # elements per message: an attribute's length is 16 bits
_RECV = 1 << 16
_MAX_IDLE = 16


@dataclass(frozen=True)
class Elements:
    """Elements to add to (or delete from) one set or map, in nft's text."""

    family: str
    table: str
    set: str
    add: bool
    items: tuple[str, ...]


def _field(text: str) -> bytes:
    """One field of a key, padded to the 4-byte registers nftables concatenates keys in."""
    if text.startswith('"'):
        name = text.strip('"').encode()
        if len(name) >= IFNAMSIZ:
            raise ValueError(f"interface name too long: {text}")
        return name.ljust(IFNAMSIZ, b"\0")
    if text.startswith("0x"):
        return int(text, 16).to_bytes((len(text) - 2 + 1) // 2, "big")
    if text in PROTOCOLS:
        return bytes([PROTOCOLS[text]]) + bytes(3)
    if text.isdigit():
        return int(text).to_bytes(2, "big") + bytes(2)
    return ipaddress.ip_address(text).packed


def encode(element: str) -> bytes:
    """NFTA_LIST_ELEM of one element in nft's text."""
    key, _, verdict = element.partition(" : ")
    out = nla_nest(NFTA_SET_ELEM_KEY, attribute(NFTA_DATA_VALUE, b"".join(_field(f) for f in key.split(" . "))))
    if verdict:
        word, _, chain = verdict.partition(" ")
        if word != "jump" or not chain:
            raise ValueError(f"unsupported verdict: {verdict}")
        out += nla_nest(NFTA_SET_ELEM_DATA, nla_nest(NFTA_DATA_VERDICT, attribute(NFTA_VERDICT_CODE, struct.pack(
            "!i", NFT_JUMP)), nla_str(NFTA_VERDICT_CHAIN, chain)))
    return nla_nest(NFTA_LIST_ELEM, out)


_lock = threading.Lock()
_idle: dict[int, socket.socket] = {}  # network namespace inode -> socket
_seq = itertools.count(1)


def apply(changes: Iterable[Elements]) -> str | None:
    """The changes in one transaction, in order; None, or why the kernel refused it (then none applies)."""
    messages = []
    for c in changes:
        head = _NFGEN.pack(FAMILIES[c.family], 0, 0) + nla_str(NFTA_SET_ELEM_LIST_TABLE, c.table) + \
            nla_str(NFTA_SET_ELEM_LIST_SET, c.set)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if c.add else NFT_MSG_DELSETELEM)
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if c.add else 0)
        try:
            encoded = [encode(e) for e in c.items]
        except ValueError as e:
            return f"{c.set}: {e}"
        for i in range(0, len(encoded), _CHUNK):
            messages.append((kind, flags, head + nla_nest(NFTA_SET_ELEM_LIST_ELEMENTS, *encoded[i:i + _CHUNK])))
    if not messages:
        return None
    netns = os.stat("/proc/thread-self/ns/net").st_ino
    with _lock:
        sock = _idle.pop(netns, None)
    if sock is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        sock.bind((0, 0))
        sock.settimeout(10)  # a kernel that never answers fails the change, which is then made in full
    try:
        refused = _exchange(sock, messages)
    except OSError as e:
        sock.close()
        return f"netlink: {e}"
    with _lock:
        if netns in _idle:
            sock.close()  # another thread's, kept
        else:
            _idle[netns] = sock
            if len(_idle) > _MAX_IDLE:  # the oldest goes: it may keep a namespace that is gone alive
                _idle.pop(next(iter(_idle))).close()
    return refused


def _exchange(sock: socket.socket, messages: list[tuple[int, int, bytes]]) -> str | None:
    batch = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
    seqs = [next(_seq) for _ in range(len(messages) + 2)]
    out = [_HEADER.pack(_HEADER.size + len(batch), NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seqs[0], 0) + batch]
    out += [_HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body
            for (kind, flags, body), seq in zip(messages, seqs[1:-1], strict=True)]
    out.append(_HEADER.pack(_HEADER.size + len(batch), NFNL_MSG_BATCH_END, NLM_F_REQUEST, seqs[-1], 0) + batch)
    sock.sendall(b"".join(out))
    waiting = set(seqs[1:-1])
    refused: str | None = None
    while waiting:
        data = sock.recv(_RECV)
        off = 0
        while off + _HEADER.size <= len(data):
            length, mtype, _flags, seq, _port = _HEADER.unpack_from(data, off)
            if length < _HEADER.size:
                return refused or "netlink: a malformed answer"
            if mtype == NLMSG_ERROR and seq in waiting:
                code = -struct.unpack_from("=i", data, off + _HEADER.size)[0]
                waiting.discard(seq)
                if code and refused is None:
                    refused = f"{os.strerror(code)} (message {seqs.index(seq)} of the batch)"
                if code:
                    waiting.clear()  # the batch is aborted: the kernel answers no more of it
            off += (length + 3) & ~3
    return refused
