"""Subnet managers: where a node gets its pod subnet and learns every peer's (Flannel's subnet.Manager)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import netaddr

from weftd.config import NetworkConfig
from weftd.lease import Attrs, Lease

log = logging.getLogger("weftd.subnet")


class StoreError(Exception):
    """The store could not be reached or read. The daemon keeps its last good view and retries."""


class SubnetManager(ABC):
    network: NetworkConfig

    @abstractmethod
    def acquire(self, node: str, attrs: Attrs) -> Lease:
        """This node's lease: reused if it has one, allocated otherwise, and published with `attrs`."""

    @abstractmethod
    def leases(self) -> dict[str, Lease]:
        """Every node's lease, by node name. Raises StoreError."""

    @abstractmethod
    def wait(self, timeout: float) -> None:
        """Returns when the store may have changed, or after `timeout` seconds."""

    def renew(self) -> bool:
        """Keeps this node's lease alive where the store expires leases; True if it renewed."""
        return False

    def close(self) -> None:  # noqa: B027 - only stores with background watchers need it
        pass


def pick_subnet(network: NetworkConfig, taken: set[netaddr.IPNetwork]) -> netaddr.IPNetwork:
    for subnet in network.subnets():
        if subnet not in taken:
            return subnet
    raise StoreError(f"out of subnets: every /{network.subnet_len} of {network.network} is leased")


def valid_for(network: NetworkConfig, subnet: netaddr.IPNetwork) -> bool:
    """A lease kept from before is reused only if it still fits the network."""
    return (subnet.prefixlen == network.subnet_len and subnet in network.network
            and subnet.first != network.network.first)
