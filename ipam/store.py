"""The reference host-local on-disk lease store (plugins/ipam/host-local/backend/disk).

`<dataDir>/<network>/<ip>` holds "<containerID>\\r\\n<ifname>"; its existence is the
reservation. `last_reserved_ip.<set>` remembers where round-robin stopped, and
`lock` is flock()ed by every writer, Weft's and host-local's alike, so the two
plugins can share one store.

Weft writes every file to a temporary name first and links or renames it into
place, so a lease is never seen half-written. All writes happen under the lock,
which is why a temporary file found while holding it is a leftover of a killed
writer and can be removed.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from dataclasses import dataclass

from ipam.config import IPAddress

LOCK = "lock"
LAST_RESERVED = "last_reserved_ip."
TMP_PREFIX = ".weft-tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o755


@dataclass(frozen=True)
class Owner:
    container_id: str
    ifname: str | None  # None: a legacy lease that names only the container

    def matches(self, container_id: str, ifname: str) -> bool:
        return self.container_id == container_id and self.ifname in (ifname, None)


def parse_owner(data: bytes) -> Owner | None:
    """None when the file is empty or corrupt: the address stays reserved, owned by nobody."""
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    parts = text.split("\r\n")
    if len(parts) > 2 or any(not p or "\n" in p or "\r" in p for p in parts):
        return None
    return Owner(parts[0], parts[1] if len(parts) == 2 else None)


class Store:
    def __init__(self, data_dir: str, network: str) -> None:
        self.dir = os.path.join(data_dir, network)
        self._lock_fd = -1

    def exists(self) -> bool:
        return os.path.isdir(self.dir)

    def __enter__(self) -> Store:
        os.makedirs(self.dir, mode=DIR_MODE, exist_ok=True)
        fd = os.open(os.path.join(self.dir, LOCK), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._lock_fd)  # closing drops the flock; so does the process dying
        self._lock_fd = -1

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _write_tmp(self, data: bytes) -> str:
        tmp = self._path(f"{TMP_PREFIX}{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return tmp

    def leases(self) -> dict[IPAddress, Owner | None]:
        """Every reserved address and its owner; removes leftovers of killed writers."""
        out: dict[IPAddress, Owner | None] = {}
        for entry in os.scandir(self.dir):
            name = entry.name
            if name.startswith(TMP_PREFIX):
                _unlink(entry.path)
                continue
            if name == LOCK or name.startswith(LAST_RESERVED) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                ip = ipaddress.ip_address(name)
            except ValueError:
                continue
            out[ip] = parse_owner(_read(entry.path))
        return out

    def owned_by(self, container_id: str, ifname: str) -> list[IPAddress]:
        return [ip for ip, o in self.leases().items() if o is not None and o.matches(container_id, ifname)]

    def reserve(self, ip: IPAddress, container_id: str, ifname: str) -> bool:
        """Atomically creates the lease; False if someone holds the address."""
        tmp = self._write_tmp(f"{container_id}\r\n{ifname}".encode())
        try:
            os.link(tmp, self._path(str(ip)))
            return True
        except FileExistsError:
            return False
        finally:
            _unlink(tmp)

    def release(self, ip: IPAddress) -> None:
        _unlink(self._path(str(ip)))

    def last_reserved(self, index: int) -> IPAddress | None:
        try:
            return ipaddress.ip_address(_read(self._path(f"{LAST_RESERVED}{index}")).decode().strip())
        except (ValueError, UnicodeDecodeError):
            return None

    def set_last_reserved(self, index: int, ip: IPAddress) -> None:
        tmp = self._write_tmp(str(ip).encode())
        os.replace(tmp, self._path(f"{LAST_RESERVED}{index}"))


def _read(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise

