"""etcd (v3, through its JSON gateway) as the store: leases with a TTL under a key prefix.

Keys follow Flannel's layout: `<prefix>/config` holds the network config and
`<prefix>/subnets/<ip>-<len>` one lease each, attached to an etcd lease with a
TTL that this node keeps alive. A node that restarts finds its key by name and
keeps its subnet.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any
from urllib.parse import urlparse

import netaddr
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease as EtcdLease

from weftd.config import ConfigError, NetworkConfig
from weftd.lease import Attrs, Lease, LeaseError
from weftd.subnet import Env, StoreError, SubnetStore, log, pick_subnet, register, valid_for

DEFAULT_PREFIX = "/weft/network"
DEFAULT_TTL = 24 * 3600


def subnet_key(prefix: str, subnet: netaddr.IPNetwork) -> str:
    return f"{prefix}/subnets/{subnet.network}-{subnet.prefixlen}"


def subnet_from_key(key: str) -> netaddr.IPNetwork:
    ip, _, plen = key.rsplit("/", 1)[-1].partition("-")
    return netaddr.IPNetwork(f"{ip}/{plen}")


@register
class EtcdStore(SubnetStore):
    name = "etcd"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, env: Env) -> None:
        parser.add_argument("--etcd-endpoint", default=env("etcd-endpoint", "http://127.0.0.1:2379"))
        parser.add_argument("--etcd-prefix", default=env("etcd-prefix", DEFAULT_PREFIX))
        parser.add_argument("--etcd-ttl", type=int, default=int(env("etcd-ttl", DEFAULT_TTL)))

    @classmethod
    def from_args(cls, args: argparse.Namespace, network: NetworkConfig | None) -> EtcdStore:
        return cls(args.etcd_endpoint, args.etcd_prefix, args.etcd_ttl, network)

    def __init__(self, endpoint: str, prefix: str = DEFAULT_PREFIX, ttl: int = DEFAULT_TTL,
                 network: NetworkConfig | None = None, timeout: float = 5.0) -> None:
        url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.client = Etcd3Client(host=url.hostname or "127.0.0.1", port=url.port or 2379,
                                  protocol=url.scheme or "http", timeout=timeout)
        self.prefix = prefix.rstrip("/")
        self.ttl = ttl
        self._lease: EtcdLease | None = None
        self._own: Lease | None = None
        self._renewed = 0.0
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.network = self._config(network)

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - requests/etcd3gw raise many types; all mean "store unusable"
            raise StoreError(f"etcd {what}: {type(e).__name__}: {e}") from None

    def _config(self, network: NetworkConfig | None) -> NetworkConfig:
        key = f"{self.prefix}/config"
        got = self._call("get config", self.client.get, key)
        if not got:
            if network is None:
                raise StoreError(f"etcd has no network config at {key} and none was given")
            self._call("create config", self.client.create, key, json.dumps(network.to_json()))
            got = self._call("get config", self.client.get, key)
        try:
            return NetworkConfig.parse(json.loads(got[0]))
        except (ConfigError, ValueError) as e:
            raise StoreError(f"etcd {key}: {e}") from None

    def _raw(self) -> dict[str, Lease]:
        items = self._call("list leases", self.client.get_prefix, f"{self.prefix}/subnets/")
        out = {}
        for value, meta in items:
            key = meta["key"].decode() if isinstance(meta.get("key"), bytes) else str(meta.get("key"))
            try:
                lease = Lease.from_json(json.loads(value), subnet=str(subnet_from_key(key)))
            except (LeaseError, ValueError, netaddr.AddrFormatError) as e:
                log.warning("ignoring etcd key %s: %s", key, e)
                continue
            out[lease.node] = lease
        return out

    def acquire(self, node: str, attrs: Attrs) -> Lease:
        for _ in range(10):
            leases = self._raw()
            grant = self._call("grant lease", self.client.lease, self.ttl)
            mine = leases.get(node)
            if mine is not None and valid_for(self.network, mine.subnet):
                lease = Lease(node, mine.subnet, attrs)
                self._call("put lease", self.client.put, subnet_key(self.prefix, lease.subnet), lease.dumps(), grant)
            else:
                taken = {le.subnet for n, le in leases.items() if n != node}
                lease = Lease(node, pick_subnet(self.network, taken), attrs)
                if not self._call("create lease", self.client.create, subnet_key(self.prefix, lease.subnet),
                                  lease.dumps(), grant):
                    self._call("revoke lease", grant.revoke)
                    continue  # another node took it first
            self._lease, self._own, self._renewed = grant, lease, time.monotonic()
            self._start_watch()
            return lease
        raise StoreError("could not acquire a subnet: lost 10 races in a row")

    def renew(self) -> bool:
        """Refreshes the TTL at a third of it; re-publishes the lease if etcd expired it meanwhile."""
        if self._own is None or time.monotonic() - self._renewed < self.ttl / 3:
            return False
        ttl = -1
        if self._lease is not None:
            try:
                ttl = int(self._lease.refresh())
            except Exception:  # noqa: BLE001 - an expired lease makes the gateway answer with an error
                ttl = -1
        if ttl <= 0:
            log.warning("etcd lease of %s expired; publishing it again", self._own.node)
            self.acquire(self._own.node, self._own.attrs)
        self._renewed = time.monotonic()
        return True

    def leases(self) -> dict[str, Lease]:
        return self._raw()

    def lease(self, node: str) -> Lease | None:
        return self._raw().get(node)

    def remove(self, node: str) -> bool:
        lease = self._raw().get(node)
        if lease is None:
            return False
        return bool(self._call("delete", self.client.delete, subnet_key(self.prefix, lease.subnet)))

    def _start_watch(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="etcd-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                events, cancel = self.client.watch_prefix(f"{self.prefix}/subnets/")
                self._changed.set()  # whatever happened while no watch was open
                for _ in events:
                    self._changed.set()
                    if self._stop.is_set():
                        cancel()
                        return
            except Exception as e:  # noqa: BLE001 - reconnect whatever went wrong
                log.debug("etcd watch: %s", e)
            self._stop.wait(1.0)

    def wait(self, timeout: float) -> None:
        self._changed.wait(timeout)
        self._changed.clear()

    def close(self) -> None:
        self._stop.set()
