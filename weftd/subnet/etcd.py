"""etcd (v3, through its JSON gateway) as the store: leases with a TTL under a key prefix.

Keys follow Flannel's layout: `<prefix>/config` holds the network config and
`<prefix>/subnets/<ip>-<len>` one lease each, attached to an etcd lease with a
TTL that this node keeps alive. A node that restarts finds its key by name and
keeps its subnet.
"""

from __future__ import annotations

import argparse
import base64
import json
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import netaddr

from weftd.config import ConfigError, NetworkConfig
from weftd.lease import Attrs, Lease, LeaseError
from weftd.option import ALL, Option, integer, key_prefix, url
from weftd.retry import Retry, Stopped, network_cause, wait_either
from weftd.subnet import LeaseCache, NoNetworkConfig, StoreError, SubnetStore, allocate, log, register

if TYPE_CHECKING:
    from etcd3gw.lease import Lease as EtcdLease

DEFAULT_PREFIX = "/weft/network"
DEFAULT_TTL = 24 * 3600


def subnet_key(prefix: str, lease: Lease) -> str:
    """Flannel's key: `10.5.52.0-24`, dual stack `10.5.52.0-24&fc00::-64`, IPv6-only `fc00::-64`."""
    return f"{prefix}/subnets/" + "&".join(f"{s.network}-{s.prefixlen}" for s in lease.subnets)


def subnets_from_key(key: str) -> tuple[str | None, str | None]:
    """(IPv4, IPv6) subnets named by a key."""
    out: dict[int, str] = {}
    for part in key.rsplit("/", 1)[-1].split("&"):
        ip, _, plen = part.rpartition("-")
        net = netaddr.IPNetwork(f"{ip}/{plen}")
        if net.version in out:
            raise ValueError(f"two IPv{net.version} subnets in {key}")
        out[net.version] = str(net.cidr)
    return out.get(4), out.get(6)


@register
class EtcdStore(SubnetStore):
    name = "etcd"
    options = (
        Option("--etcd-endpoint", "etcd store: the etcd server's URL (its v3 JSON gateway)", ALL, url,
               default="http://127.0.0.1:2379", metavar="URL"),
        Option("--etcd-prefix", "etcd store: the key prefix (PREFIX/config, PREFIX/subnets/...)", ALL, key_prefix,
               default=DEFAULT_PREFIX, metavar="PREFIX"),
        Option("--etcd-ttl", "etcd store: the lease TTL in seconds, renewed at a third of it", ALL,
               integer(1, 2**31 - 1), default=str(DEFAULT_TTL), metavar="SECONDS"),
    )

    @classmethod
    def from_args(cls, args: argparse.Namespace, network: NetworkConfig | None) -> EtcdStore:
        return cls(args.etcd_endpoint, args.etcd_prefix, args.etcd_ttl, network)

    def __init__(self, endpoint: str, prefix: str = DEFAULT_PREFIX, ttl: int = DEFAULT_TTL,
                 network: NetworkConfig | None = None, timeout: float = 5.0) -> None:
        """`network`: the config to store at `<prefix>/config` if etcd has none. Nothing is read before connect()."""
        # Imported here: weftd imports every store's module for its flags, and etcd3gw (with requests)
        # is most of what an import of this one would cost a weftd that uses another store.
        from etcd3gw.client import Etcd3Client

        url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.client = Etcd3Client(host=url.hostname or "127.0.0.1", port=url.port or 2379,
                                  protocol=url.scheme or "http", timeout=timeout)
        self.endpoint = f"{url.scheme or 'http'}://{url.netloc}"  # as the operator wrote it, for messages
        self.timeout = timeout
        self.prefix = prefix.rstrip("/")
        self.ttl = ttl
        self._seed = network
        self._lease: EtcdLease | None = None
        self._own: Lease | None = None
        self._renewed = 0.0
        self._changed = threading.Event()
        self.stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.cache = LeaseCache(self._parse)  # by key

    def connect(self, stop: threading.Event) -> None:
        super().connect(stop)
        network = Retry("reading the network config", stop, log).call(lambda: self._config(self._seed), (StoreError,))
        if network is None:
            raise NoNetworkConfig(f"etcd {self.endpoint} has no network config at {self.prefix}/config")
        self.network = network

    def _error(self, what: str, e: Exception) -> StoreError:
        cause = network_cause(e)
        if cause is not None:
            return StoreError(f"etcd {self.endpoint} unreachable: {cause}")
        detail = getattr(e, "detail_text", None) or str(e)  # etcd3gw's exceptions keep the server's answer there
        return StoreError(f"etcd {self.endpoint}: {what}: {type(e).__name__}" + (f": {detail}" if detail else ""))

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - requests/etcd3gw raise many types; all mean "store unusable"
            raise self._error(what, e) from None

    def _config(self, network: NetworkConfig | None) -> NetworkConfig | None:
        """The network config etcd holds, stored from `network` if it holds none; None if it holds none and
        `network` is None. Raises StoreError if etcd cannot be read, ConfigError if the config is wrong."""
        key = f"{self.prefix}/config"
        got = self._call("get config", self.client.get, key)
        if not got:
            if network is None:
                return None
            self._call("create config", self.client.create, key, json.dumps(network.to_json()))
            got = self._call("get config", self.client.get, key)
        try:
            return NetworkConfig.parse(json.loads(got[0]))
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"etcd {self.endpoint} {key}: {e}") from None

    @staticmethod
    def _parse(key: str, value: Any) -> Lease | None:
        try:
            v4, v6 = subnets_from_key(key)
            return Lease.from_json(json.loads(value), subnet=v4, ipv6_subnet=v6)
        except (LeaseError, ValueError, netaddr.AddrFormatError) as e:
            log.warning("ignoring etcd key %s: %s", key, e)
            return None

    def _raw(self) -> dict[str, tuple[Lease, int]]:
        """Every lease, by node, with the revision its key was created at."""
        items = self._call("list leases", self.client.get_prefix, f"{self.prefix}/subnets/")
        records = []
        created: dict[str, int] = {}
        for value, meta in items:
            key = meta["key"].decode() if isinstance(meta.get("key"), bytes) else str(meta.get("key"))
            records.append((key, value))
            created[key] = int(meta.get("create_revision") or 0)
        return {lease.node: (lease, created[key]) for key, lease in self.cache.leases(records).items()}

    def acquire(self, node: str, attrs: Attrs) -> Lease:
        for _ in range(10):
            leases = self._raw()
            grant = self._call("grant lease", self.client.lease, self.ttl)
            mine = leases[node][0] if node in leases else None
            v4, v6 = allocate(self.network, mine, (le for n, (le, _) in leases.items() if n != node))
            lease = Lease(node, v4, attrs, v6)
            key = subnet_key(self.prefix, lease)
            if mine is not None and mine.subnets == lease.subnets:
                self._call("put lease", self.client.put, key, lease.dumps(), grant)
            else:
                if not self._call("create lease", self.client.create, key, lease.dumps(), grant):
                    self._call("revoke lease", grant.revoke)
                    continue  # another node took it first
                if self._lost_race(node, key, lease):
                    self._call("revoke lease", grant.revoke)
                    continue
                if mine is not None:  # the lease moved (a family was added, or the network changed)
                    self._call("delete old lease", self.client.delete, subnet_key(self.prefix, mine))
            self._lease, self._own, self._renewed = grant, lease, time.monotonic()
            self._start_watch()
            return lease
        raise StoreError("could not acquire a subnet: lost 10 races in a row")

    def _lost_race(self, node: str, key: str, lease: Lease) -> bool:
        """Keys hold both subnets, so two nodes can create different keys sharing one subnet (both keeping their
        IPv4 subnet and picking the same new IPv6 one). The key created first keeps it; the other tries again."""
        got = self._call("get lease", self.client.get, key, metadata=True)
        if not got:
            return True
        rev = int(got[0][1].get("create_revision") or 0)
        for other, (le, other_rev) in self._raw().items():
            if other != node and set(le.subnets) & set(lease.subnets) and other_rev < rev:
                log.warning("%s took one of %s first; picking again", other, [str(s) for s in lease.subnets])
                return True
        return False

    def renew(self) -> bool:
        """Refreshes the TTL at a third of it; re-publishes the lease if etcd expired it meanwhile."""
        if self._own is None or time.monotonic() - self._renewed < self.ttl / 3:
            return False
        ttl = -1
        if self._lease is not None:
            try:
                ttl = int(self._lease.refresh())
            except Exception as e:  # noqa: BLE001 - an expired lease makes the gateway answer with an error
                if network_cause(e) is not None:
                    raise self._error("refresh lease", e) from None
                ttl = -1
        if ttl <= 0:
            log.warning("etcd lease of %s expired; publishing it again", self._own.node)
            self.acquire(self._own.node, self._own.attrs)
        self._renewed = time.monotonic()
        return True

    def leases(self) -> dict[str, Lease]:
        return {n: le for n, (le, _) in self._raw().items()}

    def lease(self, node: str) -> Lease | None:
        return self.leases().get(node)

    def remove(self, node: str) -> bool:
        lease = self.leases().get(node)
        if lease is None:
            return False
        return bool(self._call("delete", self.client.delete, subnet_key(self.prefix, lease)))

    def _start_watch(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="etcd-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        """Sets _changed whenever a lease key changes, through one watch stream of etcd's JSON gateway; a stream
        that fails or ends is opened again, with backoff."""
        prefix = f"{self.prefix}/subnets/".encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])  # the range of keys with the prefix
        request = {"create_request": {"key": base64.b64encode(prefix).decode(),
                                      "range_end": base64.b64encode(end).decode()}}
        retry = Retry("etcd watch", self.stop, log)
        try:
            while not self.stop.is_set():
                try:
                    with self.client.session.post(self.client.get_url("/watch"), json=request, stream=True,
                                                  timeout=(self.timeout, None)) as resp:
                        if resp.status_code != 200:
                            raise StoreError(f"etcd {self.endpoint}: watch: {resp.status_code} {resp.reason}")
                        retry.ok()
                        self._changed.set()  # whatever happened while no watch was open
                        for _ in resp.iter_content(chunk_size=None):
                            self._changed.set()
                            if self.stop.is_set():
                                return
                    raise StoreError(f"etcd {self.endpoint} ended the watch")
                except StoreError as e:
                    retry.pause(e)
                except Exception as e:  # noqa: BLE001 - requests raises many types; all mean "watch again"
                    retry.pause(self._error("watch", e))
        except Stopped:
            pass

    def wait(self, timeout: float) -> None:
        wait_either(self._changed, self.stop, timeout)
        self._changed.clear()
