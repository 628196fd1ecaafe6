"""The hand-over of one CNI invocation from the `weft` executable to a warm weftd.

A request is the invocation as the runtime made it: the environment, the config
bytes, and the pod's network namespace as an open file descriptor (SCM_RIGHTS),
so weftd needs no view of the caller's paths. The reply is the exit status and
what the plugin would have printed. Frames are a 4-byte length and JSON; only
small standard-library modules are imported, since this runs for every pod.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Mapping

HEADER = struct.Struct("!II")  # environment JSON length, config length
REPLY = struct.Struct("!I")
MAX_ENV = 1 << 20
MAX_CONFIG = 1 << 20
TIMEOUT = 300.0
SOCKET_KEY = "daemonSocket"
SERVED = ("ADD", "DEL", "CHECK", "GC", "STATUS")


class Unanswered(Exception):
    """The request reached weftd, but no reply came back."""


def socket_path(raw: bytes) -> str | None:
    """The weftd socket that the network config names, if any."""
    if SOCKET_KEY.encode() not in raw:
        return None
    try:
        conf = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    path = conf.get(SOCKET_KEY) if isinstance(conf, dict) else None
    return path if isinstance(path, str) and path.startswith("/") and "\0" not in path else None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def call(path: str, raw: bytes, environ: Mapping[str, str], netns_fd: int | None) -> tuple[int, str, str] | None:
    """(status, stdout, stderr) from weftd; None if weftd is not there to take the request.

    Raises Unanswered if weftd took the request but did not reply.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            return None
        env = json.dumps(dict(environ)).encode()
        head = HEADER.pack(len(env), len(raw)) + env + raw
        try:
            anc = [] if netns_fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", netns_fd))]
            sent = sock.sendmsg([head], anc)
            if sent < len(head):
                sock.sendall(head[sent:])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return None  # weftd went away before it had the whole request: nothing was done
        try:
            (size,) = REPLY.unpack(_recv_exact(sock, REPLY.size))
            reply = json.loads(_recv_exact(sock, size))
            return int(reply["status"]), str(reply["stdout"]), str(reply.get("stderr", ""))
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            raise Unanswered(str(e)) from None
    finally:
        sock.close()


def read_request(conn: socket.socket) -> tuple[dict[str, str], bytes, list[int]]:
    """weftd's side: the environment, the config bytes and the passed descriptors."""
    fds: list[int] = []
    msg, ancdata, _flags, _addr = conn.recvmsg(HEADER.size, socket.CMSG_SPACE(4 * 4))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
    try:
        if len(msg) < HEADER.size:
            msg += _recv_exact(conn, HEADER.size - len(msg))
        env_len, raw_len = HEADER.unpack(msg)
        if env_len > MAX_ENV or raw_len > MAX_CONFIG + 1:
            raise ValueError(f"request too large ({env_len} + {raw_len} bytes)")
        env = json.loads(_recv_exact(conn, env_len))
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("environment must be an object of strings")
        return env, _recv_exact(conn, raw_len), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def write_reply(conn: socket.socket, status: int, stdout: str, stderr: str) -> None:
    body = json.dumps({"status": status, "stdout": stdout, "stderr": stderr}).encode()
    conn.sendall(REPLY.pack(len(body)) + body)
