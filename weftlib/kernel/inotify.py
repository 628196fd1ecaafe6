"""inotify(7) through libc: watches on directories, and their events read without blocking."""

from __future__ import annotations

import ctypes
import os
import select
import struct
from dataclasses import dataclass

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name, NUL-padded)
_libc: ctypes.CDLL | None = None


def _call(name: str, *args: object) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    ret = int(getattr(_libc, name)(*args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    cookie: int
    name: str  # '' for an event on the watched directory itself (or the queue)


class Inotify:
    """One inotify instance: a non-blocking, close-on-exec descriptor. Raises OSError (EMFILE at the user's
    limit of instances)."""

    def __init__(self) -> None:
        self.fd = _call("inotify_init1", os.O_NONBLOCK | os.O_CLOEXEC)

    def watch(self, path: str, mask: int) -> int:
        """Adds (or replaces) the watch on `path`; returns its descriptor. Raises OSError: ENOENT, ENOTDIR
        (with IN_ONLYDIR), ENOSPC at the user's limit of watches."""
        return _call("inotify_add_watch", self.fd, os.fsencode(path), ctypes.c_uint32(mask))

    def unwatch(self, wd: int) -> None:
        try:
            _call("inotify_rm_watch", self.fd, wd)
        except OSError:
            pass  # gone with its directory already

    def ready(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for events to read."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(max(0, int(timeout * 1000))))

    def read(self) -> list[Event]:
        """Every event queued now (none: an empty list)."""
        events: list[Event] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            off = 0
            while off < len(buf):
                wd, mask, cookie, length = _HEADER.unpack_from(buf, off)
                off += _HEADER.size
                name = buf[off:off + length].rstrip(b"\0")
                off += length
                events.append(Event(wd, mask, cookie, os.fsdecode(name)))

    def close(self) -> None:
        os.close(self.fd)
