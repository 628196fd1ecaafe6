"""Network namespaces by path: open, verify, and enter for the calling thread only."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NotNetNS(Exception):
    """The path exists but is not a network namespace other than our own."""


class NetNS:
    def __init__(self, path: str, fd: int | None = None) -> None:
        """Opens `path`, or takes a copy of `fd` already opened from it.

        Raises FileNotFoundError if the path is gone, NotNetNS if it is not a usable netns.
        """
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if fd is None else os.dup(fd)
        try:
            mine = os.stat("/proc/thread-self/ns/net")
            st = os.fstat(self.fd)
            if st.st_dev != mine.st_dev:
                raise NotNetNS(f"{path} is not a network namespace")
            if st.st_ino == mine.st_ino:
                raise NotNetNS(f"{path} is the plugin's own network namespace")
            with self.entered():  # setns() refuses anything but a netns
                pass
        except NotNetNS:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise NotNetNS(f"{path} is not a network namespace: {e.strerror}") from None

    @contextmanager
    def entered(self) -> Iterator[None]:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self.fd)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
