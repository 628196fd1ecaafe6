"""Subnet stores: where a node gets its pod subnet lease and learns every peer's (Flannel's subnet.Manager).

Each store is one module of this package that registers its class with `@register`; the class
names itself (`--store NAME`), declares its own options (weftd.options) and builds itself from them.
Adding a store is adding a module here.
"""

from __future__ import annotations

import argparse
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import netaddr

from weftd.config import FamilyConfig, NetworkConfig
from weftd.lease import Attrs, Lease
from weftd.option import Option
from weftlib.registry import Registry

log = logging.getLogger("weftd.subnet")


class StoreError(Exception):
    """The store could not be reached or read. The daemon keeps its last good view and retries."""


class NoNetworkConfig(StoreError):
    """The store holds no network config, and none was given to seed it with."""


class SubnetStore(ABC):
    """The interface weftd's daemon and commands use. Every method may raise StoreError."""

    name: ClassVar[str]
    # The store's own options, for every command (every store's are accepted, whichever is chosen).
    options: ClassVar[tuple[Option, ...]] = ()
    network: NetworkConfig
    stop: threading.Event  # ends the store's waits, retries and watches (close() sets it)

    @classmethod
    @abstractmethod
    def from_args(cls, args: argparse.Namespace, network: NetworkConfig | None) -> SubnetStore:
        """The store the flags describe. `network`: the --net-conf file's config, if there is one."""

    def connect(self, stop: threading.Event) -> None:
        """`weftd run` calls this first: from then on `stop` (weftd's) ends the store's waits, retries and watches.
        A store that must read something before use (etcd: the network config) reads it here, retrying until the
        store answers; raises Stopped if `stop` is set first."""
        self.stop = stop

    @abstractmethod
    def acquire(self, node: str, attrs: Attrs) -> Lease:
        """This node's lease: reused if it has one, allocated otherwise, and published with `attrs`."""

    @abstractmethod
    def leases(self) -> dict[str, Lease]:
        """Every node's lease, by node name."""

    @abstractmethod
    def lease(self, node: str) -> Lease | None:
        """One node's lease as the store holds it now, or None if it has none."""

    @abstractmethod
    def remove(self, node: str) -> bool:
        """Deletes a node's lease (`weftd remove-node`); False if it had none."""

    @abstractmethod
    def wait(self, timeout: float) -> None:
        """Returns when the store may have changed, after `timeout` seconds, or soon after `stop` is set."""

    def network_ready(self, node: str) -> None:  # noqa: B027 - only the kube store publishes it
        """Tells the cluster this node's routes are programmed. Raises StoreError."""

    def renew(self) -> bool:
        """Keeps this node's lease alive where the store expires leases; True if it renewed."""
        return False

    def close(self) -> None:
        self.stop.set()


class LeaseCache:
    """A store's leases as parsed in its last round, so that a round parses again only the records that changed
    (at 5,000 peers, parsing every lease every round costs more than the rest of the round).

    A record is (key, raw): the store's own form of one lease (a JSON object, an etcd value, a Node object),
    compared with == to the last round's. `parse(key, raw)` is its lease, or None for a record to pass over
    (it logs why, once per change of the record).
    """

    def __init__(self, parse: Callable[[str, Any], Lease | None]) -> None:
        self._parse = parse
        self._kept: dict[str, tuple[Any, Lease | None]] = {}
        self.parses = 0  # how many records have been parsed

    def leases(self, records: Iterable[tuple[str, Any]]) -> dict[str, Lease]:
        """The lease of each record, by key, in the records' order; a record gone since the last round is forgotten."""
        kept: dict[str, tuple[Any, Lease | None]] = {}
        out: dict[str, Lease] = {}
        for key, raw in records:
            hit = self._kept.get(key)
            if hit is not None and hit[0] == raw:
                lease = hit[1]
            else:
                lease = self._parse(key, raw)
                self.parses += 1
            kept[key] = (raw, lease)
            if lease is not None:
                out[key] = lease
        self._kept = kept
        return out


_registry: Registry[type[SubnetStore]] = Registry(__name__, __path__, lambda cls: cls.name)
register = _registry.register  # class decorator: makes a store known by its `name`


def types() -> dict[str, type[SubnetStore]]:
    """Every store, by name: the modules of this package register theirs when imported."""
    return _registry.all()


def pick_subnet(family: FamilyConfig, taken: set[netaddr.IPNetwork]) -> netaddr.IPNetwork:
    for subnet in family.subnets():
        if subnet not in taken:
            return subnet
    raise StoreError(f"out of subnets: every /{family.subnet_len} from {family.subnet_min} to "
                     f"{family.subnet_max} of {family.network} is leased")


Subnets = tuple[netaddr.IPNetwork | None, netaddr.IPNetwork | None]


def allocate(network: NetworkConfig, mine: Lease | None, others: Iterable[Lease]) -> Subnets:
    """This node's (IPv4, IPv6) subnets: per enabled family, the one it holds if it still fits the network,
    else the first free one. A disabled family's is None."""
    others = list(others)
    out: list[netaddr.IPNetwork | None] = []
    for version in (4, 6):
        family = network.family(version)
        held = mine.family_subnet(version) if mine is not None else None
        if family is None:
            out.append(None)
        elif family.valid(held):
            out.append(held)
        else:
            taken = {s for le in others if (s := le.family_subnet(version)) is not None}
            out.append(pick_subnet(family, taken))
    return out[0], out[1]
