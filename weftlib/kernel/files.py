"""Files that are never seen half-written, and the flock that serialises their writers."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager


def write_atomic(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o644, *, tmp: str | None = None,
                 exclusive: bool = False, fsync: bool = False) -> bool:
    """Writes `data` to a temporary file beside `path`, then moves it into place in one step.

    `exclusive`: link it into place, so an existing `path` is left alone and False is returned (a
    reservation). Otherwise it replaces `path`. `tmp` names the temporary file (default
    `.<name>.<pid>.tmp` in the same directory); `fsync` makes the content durable before the move.
    """
    path = os.fspath(path)
    if tmp is None:
        head, name = os.path.split(path)
        tmp = os.path.join(head, f".{name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink(tmp)
        raise
    os.close(fd)
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        os.replace(tmp, path)
        tmp = ""
        return True
    finally:
        if tmp:
            unlink(tmp)


def replace_if_changed(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> bool:
    """Writes `text` to `path` (atomically, durably) unless it already holds it; True if it changed."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    except (OSError, UnicodeDecodeError):
        pass
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    return write_atomic(path, text, mode, fsync=True)


def unlink(path: str) -> None:
    """Removes `path`; a file already gone is fine."""
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def lock(path: str | os.PathLike[str], mode: int = 0o600) -> int:
    """Opens (creating) `path` and takes an exclusive flock on it; closing the descriptor releases it."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def locked(path: str | os.PathLike[str], mode: int = 0o600) -> Iterator[None]:
    fd = lock(path, mode)
    try:
        yield
    finally:
        os.close(fd)
