"""The hand-over of one CNI invocation from the `weft` executable to a warm weftd: weftd's side.

The client is the compiled shim (shim/weft-shim.c), which containerd runs for every
pod. On each connection weftd speaks first: GREETING, "WEFT" and the protocol
version; a shim built for another version closes and runs the Python plugin
itself, having sent nothing. A request is then the invocation as the runtime
made it: the environment, the config bytes, and the pod's network namespace as
an open file descriptor (SCM_RIGHTS), so weftd needs no view of the caller's
paths. The reply is the exit status and what the plugin would have printed.
Change the wire format only together with PROTOCOL and the shim.
"""

from __future__ import annotations

import _socket
import os
import struct

from weftlib.cni.stdin import MAX_STDIN

PROTOCOL = 1
GREETING = b"WEFT" + struct.pack("!I", PROTOCOL)
REQUEST = struct.Struct("!II")  # environment block length, config length
REPLY = struct.Struct("!iII")  # exit status, stdout length, stderr length
MAX_ENV = 1 << 20
MAX_CONFIG = MAX_STDIN
TIMEOUT = 300.0
SOCKET_KEY = "daemonSocket"


def _recv_exact(sock: _socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def decode_env(block: bytes) -> dict[str, str]:
    env = {}
    for item in block.split(b"\0"):
        if item:
            k, sep, v = item.partition(b"=")
            if not sep:
                raise ValueError("environment entry without '='")
            env[os.fsdecode(k)] = os.fsdecode(v)
    return env


def read_request(conn: _socket.socket) -> tuple[dict[str, str], bytes, list[int]]:
    """weftd's side: the environment, the config bytes and the passed descriptors."""
    fds: list[int] = []
    msg, ancdata, _flags, _addr = conn.recvmsg(REQUEST.size, _socket.CMSG_SPACE(4 * 4))
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
    try:
        if len(msg) < REQUEST.size:
            msg += _recv_exact(conn, REQUEST.size - len(msg))
        env_len, raw_len = REQUEST.unpack(msg)
        if env_len > MAX_ENV or raw_len > MAX_CONFIG + 1:
            raise ValueError(f"request too large ({env_len} + {raw_len} bytes)")
        env = decode_env(_recv_exact(conn, env_len))
        return env, _recv_exact(conn, raw_len), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def write_reply(conn: _socket.socket, status: int, stdout: str, stderr: str) -> None:
    out, err = stdout.encode(), stderr.encode()
    conn.sendall(REPLY.pack(status, len(out), len(err)) + out + err)
