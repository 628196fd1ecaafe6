"""Backends program the kernel so this node reaches every peer's pod subnet (Flannel's backend.Backend).

Each backend is one module of this package that registers its class with `@register`; the class
names its `Backend.Type`, parses its own config (`config_type`) and reads the data peers publish
with their leases (`Attrs.data`, opaque to everything else). `parse_config` and `create` are the
only places that look at the type string. Adding a backend is adding a module here.

The rooms beside the backends: `underlay` finds the interface peers reach this node through,
`sync` makes the kernel's routes, neighbours and FDB entries exactly what a backend wants, and
`errors` holds what goes wrong.
"""

from __future__ import annotations

import argparse
import builtins
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import netaddr
from pyroute2 import IPRoute

from weftd.backend.errors import BackendConfigError
from weftd.backend.sync import RouteSpec, Stats, on_link, sync_routes
from weftd.backend.underlay import Underlay
from weftd.lease import Attrs, Lease
from weftd.option import Option
from weftlib.gojson import lookup_ci
from weftlib.registry import Registry

log = logging.getLogger("weftd.backend")
DEFAULT_TYPE = "vxlan"


@dataclass(frozen=True)
class BackendConfig:
    """`Backend` in the network config: what every backend understands. Backends extend it."""

    type: str
    mtu: int | None = None  # the underlay MTU to assume; default: the interface's

    @classmethod
    def fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments from `d`; subclasses add theirs."""
        mtu = lookup_ci(d, "MTU")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535):
            raise BackendConfigError(f"Backend.MTU {mtu!r} must be an integer from 576 to 65535")
        return {"type": lookup_ci(d, "Type", DEFAULT_TYPE), "mtu": mtu}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> BackendConfig:
        return cls(**cls.fields(d))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Type": self.type}
        if self.mtu:
            out["MTU"] = self.mtu
        return out


C = TypeVar("C", bound=BackendConfig)


class Backend(ABC, Generic[C]):
    type: ClassVar[str]
    config_type: ClassVar[builtins.type[BackendConfig]] = BackendConfig
    # The backend's own options, for `weftd run` and `weftd uninstall` (every backend's are accepted).
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, ipr: IPRoute, cfg: C, underlay: Underlay, published: Attrs | None = None) -> None:
        """`published`: what this node published with its lease before this start, if anything."""
        self.ipr = ipr
        self.cfg = cfg
        self.underlay = underlay

    @classmethod
    def create(cls, ipr: IPRoute, cfg: BackendConfig, networks: list[netaddr.IPNetwork], underlay: Underlay,
               published: Attrs | None, args: argparse.Namespace) -> Backend[Any]:
        """The backend for `cfg` (parsed by this class's config_type), the cluster's pod networks (one per
        enabled family, IPv4 first) and the command line's flags."""
        own: Any = cfg  # parsed by this class's config_type (parse_config)
        return cls(ipr, own, underlay, published)

    @abstractmethod
    def attrs(self) -> Attrs:
        """What peers need to reach this node, published with its lease."""

    @abstractmethod
    def mtu(self) -> int:
        """The pod MTU this backend allows."""

    def setup(self, own: Lease) -> None:
        """Creates the devices the backend needs; idempotent."""

    @abstractmethod
    def reconcile(self, own: Lease, peers: list[Lease]) -> Stats:
        """Makes the kernel match `peers` exactly: adds what is missing, fixes drift, removes the rest."""

    @classmethod
    def teardown(cls, ipr: IPRoute, args: argparse.Namespace) -> None:
        """Removes everything a backend of this type may have made on the node, whatever its config (uninstall)."""
        sync_routes({}, Stats())

    def info(self) -> dict[str, str]:
        """What /healthz says about the backend beyond ok or not."""
        return {}

    def observe(self, metrics: Any) -> None:
        """Sets the backend's own metrics after a reconciliation."""

    def close(self) -> None:
        """weftd stops; the kernel state stays."""

    @property
    def versions(self) -> list[int]:
        """The address families this node carries: those it has an underlay address for."""
        return [v for v in (4, 6) if self.underlay.address(v) is not None]

    def hostgw_routes(self, peers: list[Lease], stats: Stats) -> dict[netaddr.IPNetwork, RouteSpec]:
        """Routes to peers' subnets through their underlay address of the same family, for every family in which
        the peer is on-link. A peer unreachable in any family it shares with this node is reported."""
        out = {}
        gateways = [gw for p in peers for v in self.versions if (gw := p.attrs.public(v)) is not None]
        direct = on_link(gateways, self.underlay.index)
        for p in peers:
            reached = True
            for v in self.versions:
                subnet, gw = p.family_subnet(v), p.attrs.public(v)
                if subnet is None:
                    continue
                if gw is not None and gw in direct:
                    out[subnet] = RouteSpec(gw, self.underlay.index)
                else:
                    reached = False
            if not reached:
                stats.unreachable.append(p.node)
        return out


_registry: Registry[type[Backend[Any]]] = Registry(__name__, __path__, lambda cls: cls.type)
register = _registry.register  # class decorator: makes a backend known by its `type`


def types() -> dict[str, type[Backend[Any]]]:
    """Every backend, by type: the modules of this package register theirs when imported."""
    return _registry.all()


def parse_config(d: Mapping[str, Any] | None) -> BackendConfig:
    """`Backend` from the network config, parsed by the backend it names."""
    d = d or {}
    if not isinstance(d, Mapping):
        raise BackendConfigError("Backend must be a JSON object")
    kind = lookup_ci(d, "Type", DEFAULT_TYPE)
    known = types()
    if not isinstance(kind, str) or kind not in known:
        raise BackendConfigError(f"Backend.Type {kind!r} must be one of {tuple(sorted(known))}")
    return known[kind].config_type.parse(d)


def create(ipr: IPRoute, cfg: BackendConfig, networks: list[netaddr.IPNetwork], underlay: Underlay,
           published: Attrs | None, args: argparse.Namespace) -> Backend[Any]:
    """The backend `cfg` names (the network config's `Backend`), for the cluster's pod networks."""
    return types()[cfg.type].create(ipr, cfg, networks, underlay, published, args)
