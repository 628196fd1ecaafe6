"""Subnet stores: where a node gets its pod subnet lease and learns every peer's (Flannel's subnet.Manager).

Each store is one module of this package that registers its class with `@register`; the class
names itself (`--store NAME`), declares its own command-line flags and builds itself from them.
Adding a store is adding a module here.
"""

from __future__ import annotations

import argparse
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import netaddr

from weftd.config import NetworkConfig
from weftd.lease import Attrs, Lease
from weftlib.registry import import_modules

log = logging.getLogger("weftd.subnet")


class StoreError(Exception):
    """The store could not be reached or read. The daemon keeps its last good view and retries."""


Env = Callable[[str, Any], Any]  # a flag's default from the environment (WEFTD_<FLAG>)


class SubnetStore(ABC):
    """The interface weftd's daemon and commands use. Every method may raise StoreError."""

    name: ClassVar[str]
    network: NetworkConfig

    @classmethod  # noqa: B027 - a store without flags of its own needs nothing here
    def add_arguments(cls, parser: argparse.ArgumentParser, env: Env) -> None:
        """Adds the store's own flags (every store's are accepted, whichever is chosen)."""

    @classmethod
    @abstractmethod
    def from_args(cls, args: argparse.Namespace, network: NetworkConfig | None) -> SubnetStore:
        """The store the flags describe. `network`: the --net-conf file's config, if there is one."""

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
        """Returns when the store may have changed, or after `timeout` seconds."""

    def network_ready(self, node: str) -> None:  # noqa: B027 - only the kube store publishes it
        """Tells the cluster this node's routes are programmed. Raises StoreError."""

    def renew(self) -> bool:
        """Keeps this node's lease alive where the store expires leases; True if it renewed."""
        return False

    def close(self) -> None:  # noqa: B027 - only stores with background watchers need it
        pass


_registry: dict[str, type[SubnetStore]] = {}


def register(cls: type[SubnetStore]) -> type[SubnetStore]:
    """Class decorator: makes a store known by its `name`."""
    _registry[cls.name] = cls
    return cls


def types() -> dict[str, type[SubnetStore]]:
    """Every store, by name: the modules of this package register theirs when imported."""
    import_modules(__name__, __path__)
    return _registry


def pick_subnet(network: NetworkConfig, taken: set[netaddr.IPNetwork]) -> netaddr.IPNetwork:
    for subnet in network.subnets():
        if subnet not in taken:
            return subnet
    raise StoreError(f"out of subnets: every /{network.subnet_len} of {network.network} is leased")


def valid_for(network: NetworkConfig, subnet: netaddr.IPNetwork) -> bool:
    """A lease kept from before is reused only if it still fits the network."""
    return (subnet.prefixlen == network.subnet_len and subnet in network.network
            and subnet.first != network.network.first)
