"""Denied packets, read from the NFLOG group the pod chains log to, as log lines with pod names.

A minimal nfnetlink_log client: bind the group, copy the first bytes of each packet, and read the
prefix (the pod chain's name) and the IP header. Rate-limited in the ruleset (20 a second per chain).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger("weftd.policy.denied")
NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE = 1, 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
PROTOCOLS = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP"}


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * ((4 - length % 4) % 4)


def describe_packet(payload: bytes) -> tuple[str, str, str] | None:
    """(protocol, source, destination) of an IPv4 or IPv6 packet, with ports where there are some."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        proto, hl = payload[9], (payload[0] & 15) * 4
        src, dst = socket.inet_ntop(socket.AF_INET, payload[12:16]), socket.inet_ntop(socket.AF_INET, payload[16:20])
    elif version == 6 and len(payload) >= 40:
        proto, hl = payload[6], 40
        src, dst = socket.inet_ntop(socket.AF_INET6, payload[8:24]), socket.inet_ntop(socket.AF_INET6, payload[24:40])
    else:
        return None
    name = PROTOCOLS.get(proto, str(proto))
    if proto in (6, 17, 132) and len(payload) >= hl + 4:
        sport, dport = struct.unpack(">HH", payload[hl:hl + 4])
        return name, f"{src}:{sport}", f"{dst}:{dport}"
    return name, src, dst


class NflogReader:
    """Reads `group` in the calling thread's network namespace; `explain(prefix, src, dst)` names them."""

    def __init__(self, group: int, explain: Callable[[str, str, str], str]) -> None:
        self.group = group
        self.explain = explain
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self._config(_attr(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND)))
        self._config(_attr(NFULA_CFG_MODE, struct.pack(">IBx", 128, NFULNL_COPY_PACKET)))
        self._thread = threading.Thread(target=self._run, name="nflog", daemon=True)

    def _config(self, attrs: bytes) -> None:
        body = struct.pack("BBH", socket.AF_UNSPEC, 0, socket.htons(self.group)) + attrs
        kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        self.sock.send(struct.pack("=IHHII", 16 + len(body), kind, 1 | 4, 0, 0) + body)  # REQUEST | ACK
        reply = self.sock.recv(65536)
        if len(reply) >= 20 and struct.unpack("=H", reply[4:6])[0] == 2:  # NLMSG_ERROR
            err = struct.unpack("=i", reply[16:20])[0]
            if err:
                raise OSError(-err, f"NFLOG group {self.group}: {errno.errorcode.get(-err, err)}")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError as e:
                log.error("NFLOG group %d: %s; no more denied-packet logs", self.group, e)
                return
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack("=IH", data[off:off + 6])
                if length < 16:
                    break
                if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                    self._packet(data[off + 20:off + length])
                off += (length + 3) & ~3

    def _packet(self, attrs: bytes) -> None:
        prefix, payload, off = "", b"", 0
        while off + 4 <= len(attrs):
            length, kind = struct.unpack("=HH", attrs[off:off + 4])
            if length < 4:
                break
            value = attrs[off + 4:off + length]
            if kind & 0x7FFF == NFULA_PREFIX:
                prefix = value.rstrip(b"\0").decode(errors="replace")
            elif kind & 0x7FFF == NFULA_PAYLOAD:
                payload = value
            off += (length + 3) & ~3
        what = describe_packet(payload)
        if what is not None:
            proto, src, dst = what
            log.info("denied %s %s -> %s: %s", proto, src, dst, self.explain(prefix, src, dst))
