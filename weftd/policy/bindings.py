"""Which pod is which on this node: the pods weftd attached, bound to their Pod objects, and every pod veth with
the addresses weft-ipam reserved for it.

A binding comes from a CNI ADD that weftd served (the pod's namespace and name, its addresses) and is kept in
a file, so a restarted weftd still knows its pods. The veths come from weft-ipam's reservations
(ipam.reservations), so they also cover pods attached while weftd was away.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netaddr

from ipam.reservations import Owner, Reader
from weftd.policy.layout import PortBinding
from weftlib.ipnet import IPAddress
from weftlib.kernel.files import write_atomic
from weftlib.kernel.netlink import host_veth_name

log = logging.getLogger("weftd.policy")


@dataclass(frozen=True)
class Binding:
    """A pod this node attached: the CNI ADD tells its name and addresses."""

    namespace: str
    name: str
    ips: tuple[netaddr.IPAddress, ...]

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "ips": [str(ip) for ip in self.ips]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Binding:
        return cls(str(d["namespace"]), str(d["name"]), tuple(netaddr.IPAddress(ip) for ip in d["ips"]))


class Bindings:
    """The bindings by container ID, saved to `path` at every change. Safe to use from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._by_container = self._load()

    def _load(self) -> dict[str, Binding]:
        try:
            data = json.loads(self.path.read_text())
            return {cid: Binding.from_json(b) for cid, b in data.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError, netaddr.AddrFormatError) as e:
            log.error("%s is unreadable (%s); pods attached before are known again from their Pod objects",
                      self.path, e)
            return {}

    def _save(self) -> None:
        write_atomic(self.path, json.dumps({c: b.to_json() for c, b in sorted(self._by_container.items())}))

    def all(self) -> list[Binding]:
        with self._lock:
            return list(self._by_container.values())

    def put(self, container_id: str, binding: Binding | None) -> Binding | None:
        """Binds the container (None: unbinds it); what it was bound to before."""
        with self._lock:
            before = self._by_container.pop(container_id, None)
            if binding is not None:
                self._by_container[container_id] = binding
            if binding is not None or before is not None:
                self._save()
            return before


class Ports:
    """Every pod veth on this node with its addresses, from weft-ipam's reservations of one network."""

    def __init__(self, reservation_dir: Path) -> None:
        self.reservations = Reader(str(reservation_dir))
        # By reservation, its veth and address as the ruleset names them: an ADD pays for its own pod only.
        self._named: dict[tuple[IPAddress, Owner], tuple[str, netaddr.IPAddress]] = {}

    def stamp(self) -> tuple[int, int] | None:
        """Changes whenever a reservation is made or released."""
        return self.reservations.stamp()

    def bindings(self) -> list[PortBinding]:
        ports: dict[str, list[netaddr.IPAddress]] = {}
        known, self._named = self._named, {}
        for ip, owner in self.reservations.read().items():
            if owner is None or owner.ifname is None:
                continue  # names no veth: a legacy or unreadable reservation
            named = known.get((ip, owner))
            if named is None:
                named = (host_veth_name(owner.container_id, owner.ifname), netaddr.IPAddress(int(ip), ip.version))
            self._named[(ip, owner)] = named
            ports.setdefault(named[0], []).append(named[1])
        return [PortBinding(name, tuple(sorted(ips))) for name, ips in sorted(ports.items())]

    @staticmethod
    def port(container_id: str, ifname: str, ips: Iterable[netaddr.IPAddress]) -> PortBinding:
        """The veth of one pod interface, named as bindings() names it from the interface's reservations."""
        return PortBinding(host_veth_name(container_id, ifname), tuple(sorted(ips)))

    def forget(self) -> None:
        """The next read reads every reservation again."""
        self.reservations.forget()
        self._named.clear()
