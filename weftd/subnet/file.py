"""The embedded store: one JSON file shared by several nodes simulated on one machine.

Writers hold an flock and replace the file atomically, so readers never see it half-written.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from weftd.config import ConfigError, NetworkConfig
from weftd.lease import Attrs, Lease, LeaseError
from weftd.option import ALL, Option, path
from weftd.subnet import LeaseCache, NoNetworkConfig, StoreError, SubnetStore, allocate, log, register
from weftlib.kernel import files


@register
class FileStore(SubnetStore):
    name = "file"
    options = (Option("--store-path", "file store: the shared JSON file", ALL, path,
                      default="/var/lib/weft/store.json", metavar="FILE"),)

    @classmethod
    def from_args(cls, args: argparse.Namespace, network: NetworkConfig | None) -> FileStore:
        return cls(args.store_path, network)

    def __init__(self, path: str | Path, network: NetworkConfig | None = None) -> None:
        self.path = Path(path)
        self.stop = threading.Event()
        self._seen: tuple[int, int, int] | None = None
        self.cache = LeaseCache(self._parse)  # by node
        with self._locked():
            data = self._read()
            if "config" not in data:
                if network is None:
                    raise NoNetworkConfig(f"{self.path} holds no network config")
                data["config"] = network.to_json()
                data.setdefault("leases", {})
                self._write(data)
        try:
            self.network = NetworkConfig.parse(data["config"])
        except ConfigError as e:
            raise StoreError(f"{self.path}: {e}") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with files.locked(f"{self.path}.lock"):
            yield

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StoreError(f"reading {self.path}: {e}") from None
        if not isinstance(data, dict):
            raise StoreError(f"{self.path} is not a JSON object")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        files.write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True), 0o644)

    def acquire(self, node: str, attrs: Attrs) -> Lease:
        with self._locked():
            data = self._read()
            leases: dict[str, Any] = data.setdefault("leases", {})
            mine = self._parse(node, leases.get(node))
            others = [le for n, raw in leases.items() if n != node if (le := self._parse(n, raw)) is not None]
            v4, v6 = allocate(self.network, mine, others)
            lease = Lease(node, v4, attrs, v6)
            leases[node] = lease.to_json()
            self._write(data)
        return lease

    def remove(self, node: str) -> bool:
        with self._locked():
            data = self._read()
            gone = data.get("leases", {}).pop(node, None) is not None
            if gone:
                self._write(data)
        return gone

    @staticmethod
    def _parse(node: str, raw: Any) -> Lease | None:
        if raw is None:
            return None
        try:
            lease = Lease.from_json(raw)
        except LeaseError as e:
            log.warning("ignoring lease of %s: %s", node, e)
            return None
        return Lease(node, lease.subnet, lease.attrs, lease.ipv6_subnet)

    def lease(self, node: str) -> Lease | None:
        return self.leases().get(node)

    def leases(self) -> dict[str, Lease]:
        return self.cache.leases(self._read().get("leases", {}).items())

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._seen is None:
            self._seen = self._stamp()
        while time.monotonic() < deadline:
            now = self._stamp()
            if now != self._seen:
                self._seen = now
                return
            if self.stop.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                return
