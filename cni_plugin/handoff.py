"""The hand-over of one CNI invocation from the `weft` executable to a warm weftd.

A request is the invocation as the runtime made it: the environment, the config
bytes, and the pod's network namespace as an open file descriptor (SCM_RIGHTS),
so weftd needs no view of the caller's paths. The reply is the exit status and
what the plugin would have printed. This runs for every pod, so the client side
imports only built-in modules: no json (which brings re and enum) and no socket
(enum and selectors); frames are fixed headers and raw bytes.
"""

from __future__ import annotations

import _socket
import os
import struct

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs 12 ms per pod

if TYPE_CHECKING:
    from collections.abc import Mapping

REQUEST = struct.Struct("!II")  # environment block length, config length
REPLY = struct.Struct("!iII")  # exit status, stdout length, stderr length
MAX_ENV = 1 << 20
MAX_CONFIG = 1 << 20
TIMEOUT = 300.0
SOCKET_KEY = "daemonSocket"
SERVED = ("ADD", "DEL", "CHECK", "GC", "STATUS")


class Unanswered(Exception):
    """The request reached weftd, but no reply came back."""


def socket_path(raw: bytes) -> str | None:
    """The weftd socket the network config names: `"daemonSocket": "/abs/path"`, written by weftd.

    A plain scan, not a JSON parse. Anything unusual (the key twice, escapes, a relative path) gives
    None, and the plugin then runs the invocation itself, which parses the config in full.
    """
    key = b'"' + SOCKET_KEY.encode() + b'"'
    at = raw.find(key)
    if at < 0 or raw.find(key, at + 1) >= 0:
        return None
    rest = raw[at + len(key):].lstrip()
    if not rest.startswith(b":"):
        return None
    rest = rest[1:].lstrip()
    end = rest.find(b'"', 1)
    if not rest.startswith(b'"/') or end < 0:
        return None
    path = rest[1:end]
    if b"\\" in path or b"\0" in path or len(path) > 107:
        return None
    return path.decode("utf-8", "surrogateescape")


def _recv_exact(sock: _socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def encode_env(environ: Mapping[str, str]) -> bytes:
    return b"".join(os.fsencode(k) + b"=" + os.fsencode(v) + b"\0" for k, v in environ.items())


def decode_env(block: bytes) -> dict[str, str]:
    env = {}
    for item in block.split(b"\0"):
        if item:
            k, sep, v = item.partition(b"=")
            if not sep:
                raise ValueError("environment entry without '='")
            env[os.fsdecode(k)] = os.fsdecode(v)
    return env


def call(path: str, raw: bytes, environ: Mapping[str, str], netns_fd: int | None) -> tuple[int, bytes, bytes] | None:
    """(status, stdout, stderr) from weftd; None if weftd is not there to take the request.

    Raises Unanswered if weftd took the request but did not reply.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            return None
        env = encode_env(environ)
        msg = REQUEST.pack(len(env), len(raw)) + env + raw
        anc = [] if netns_fd is None else [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", netns_fd))]
        try:
            sent = sock.sendmsg([msg], anc)
            while sent < len(msg):
                sent += sock.send(msg[sent:])
            sock.shutdown(_socket.SHUT_WR)
        except OSError:
            return None  # weftd went away before it had the whole request: nothing was done
        try:
            status, out_len, err_len = REPLY.unpack(_recv_exact(sock, REPLY.size))
            return status, _recv_exact(sock, out_len), _recv_exact(sock, err_len)
        except (OSError, EOFError, struct.error) as e:
            raise Unanswered(str(e) or type(e).__name__) from None
    finally:
        sock.close()


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
