"""The reference host-local's reservations on disk (plugins/ipam/host-local/backend/disk).

`<dataDir>/<network>/<ip>` holds "<containerID>\\r\\n<ifname>"; its existence is the
reservation. `last_reserved_ip.<set>` remembers where round-robin stopped, and
`lock` is flock()ed by every writer, Weft's and host-local's alike, so the two
plugins can share one store.

Weft writes every file to a temporary name first and links or renames it into
place, so a reservation is never seen half-written. All writes happen under the lock,
which is why a temporary file found while holding it is a leftover of a killed
writer and can be removed.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from weftlib.ipnet import IPAddress
from weftlib.kernel import files

LOCK = "lock"
LAST_RESERVED = "last_reserved_ip."
TMP_PREFIX = ".weft-tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o755


@dataclass(frozen=True)
class Owner:
    container_id: str
    ifname: str | None  # None: a legacy reservation that names only the container

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


class Reservations:
    """One network's directory of reservations, used under its lock (`with Reservations(...) as r:`)."""

    def __init__(self, data_dir: str, network: str) -> None:
        self.dir = os.path.join(data_dir, network)
        self._lock_fd = -1

    def exists(self) -> bool:
        return os.path.isdir(self.dir)

    def __enter__(self) -> Reservations:
        os.makedirs(self.dir, mode=DIR_MODE, exist_ok=True)
        self._lock_fd = files.lock(os.path.join(self.dir, LOCK), FILE_MODE)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._lock_fd)  # closing drops the flock; so does the process dying
        self._lock_fd = -1

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _write(self, name: str, data: bytes, exclusive: bool) -> bool:
        return files.write_atomic(self._path(name), data, FILE_MODE, tmp=self._path(f"{TMP_PREFIX}{os.getpid()}"),
                                  exclusive=exclusive)

    def all(self) -> dict[IPAddress, Owner | None]:
        """Every reserved address and its owner; removes leftovers of killed writers."""
        out: dict[IPAddress, Owner | None] = {}
        for entry in os.scandir(self.dir):
            if entry.name.startswith(TMP_PREFIX):
                files.unlink(entry.path)
                continue
            ip = _reserved(entry)
            if ip is not None:
                out[ip] = parse_owner(_read(entry.path))
        return out

    def owned_by(self, container_id: str, ifname: str) -> list[IPAddress]:
        return [ip for ip, o in self.all().items() if o is not None and o.matches(container_id, ifname)]

    def reserve(self, ip: IPAddress, container_id: str, ifname: str) -> bool:
        """Atomically creates the reservation; False if someone holds the address."""
        return self._write(str(ip), f"{container_id}\r\n{ifname}".encode(), exclusive=True)

    def release(self, ip: IPAddress) -> None:
        files.unlink(self._path(str(ip)))

    def last_reserved(self, index: int) -> IPAddress | None:
        try:
            return ipaddress.ip_address(_read(self._path(f"{LAST_RESERVED}{index}")).decode().strip())
        except (ValueError, UnicodeDecodeError):
            return None

    def set_last_reserved(self, index: int, ip: IPAddress) -> None:
        self._write(f"{LAST_RESERVED}{index}", str(ip).encode(), exclusive=False)

    def remove_if_unused(self) -> bool:
        """Uninstall, under the lock: the directory goes if it holds nothing but the lock and the round-robin
        positions; False if anything else is left (a reservation above all), and then it is untouched."""
        self.all()  # removes leftovers of killed writers
        names = os.listdir(self.dir)
        if any(n != LOCK and not n.startswith(LAST_RESERVED) for n in names):
            return False
        for name in names:
            files.unlink(self._path(name))
        os.rmdir(self.dir)
        return True


class Reader:
    """One network's reservations as a process that only reads them sees them (weftd, at every pod it serves):
    without the lock, and removing nothing. Each file is read once: a reservation is created whole (linked or
    renamed into place) and only ever deleted, so a file whose inode and times are unchanged holds what it held."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self._kept: dict[str, tuple[tuple[int, int, int], Owner | None]] = {}

    def stamp(self) -> tuple[int, int] | None:
        """Changes whenever a reservation is made or released (the directory's mtime and inode); None: no
        directory."""
        try:
            st = os.stat(self.dir)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def read(self) -> dict[IPAddress, Owner | None]:
        """Every reserved address and its owner."""
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return {}
        known, self._kept = self._kept, {}
        out: dict[IPAddress, Owner | None] = {}
        for entry in entries:
            ip = _reserved(entry)
            if ip is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # released meanwhile
            stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            kept = known.get(entry.name)
            owner = kept[1] if kept is not None and kept[0] == stamp else parse_owner(_read(entry.path))
            self._kept[entry.name] = (stamp, owner)
            out[ip] = owner
        return out

    def forget(self) -> None:
        """The next read reads every file again."""
        self._kept.clear()


def _reserved(entry: os.DirEntry[str]) -> IPAddress | None:
    """The address a directory entry reserves; None for the lock, round-robin's state, temporary files and
    anything else."""
    name = entry.name
    if name == LOCK or name.startswith((LAST_RESERVED, TMP_PREFIX)) or not entry.is_file(follow_symlinks=False):
        return None
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


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
