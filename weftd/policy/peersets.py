"""Peer sets: the nftables sets policy rules match addresses against, named after what they mean.

A set stands for the pods one policy peer selects (its pod selector in the policy's namespace, or in the
namespaces its namespace selector picks; or the pods inside an ipBlock), optionally narrowed to one named
port. Its name hashes that meaning, never its members, so the chains that refer to it stay as they are
while pods come, go and change labels: a pod's change is elements added to and deleted from the sets it
leaves and joins. Members are addresses (`p4_*`, `p6_*`), or `address . protocol . port` for egress to a
named port (`n4_*`, `n6_*`). An ipBlock's own addresses (its cidr less its excepts) are a fixed interval set
(`b4_*`, `b6_*`).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from weftd.policy.layout import FAMILY, PROTO
from weftd.policy.model import IPBlock, LabelSelector, Peer, Pod


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _selector_text(sel: LabelSelector | None) -> str:
    if sel is None:
        return "-"
    return repr((sel.labels, tuple((r.key, r.operator, sorted(r.values)) for r in sel.expressions)))


@dataclass(frozen=True)
class Peers:
    """Which pods: those in `namespace` (or, with none, in the namespaces `namespace_selector` matches) that
    `pod_selector` matches (None: all of them); or, with `block`, those with an address in it."""

    namespace: str | None = None
    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None
    block: IPBlock | None = None

    @classmethod
    def of(cls, namespace: str, peer: Peer) -> Peers:
        """The pods a peer of a policy in `namespace` selects."""
        if peer.ip_block is not None:
            return cls(block=peer.ip_block)
        if peer.namespace_selector is None:
            return cls(namespace, None, peer.pod_selector)
        return cls(None, peer.namespace_selector, peer.pod_selector)

    def in_namespace(self, namespace: str, labels: Mapping[str, str]) -> bool:
        """Whether pods of that namespace (with those labels) may be among them."""
        if self.block is not None:
            return True
        if self.namespace is not None:
            return namespace == self.namespace
        return self.namespace_selector is not None and self.namespace_selector.matches(labels)

    def selects(self, pod: Pod) -> bool:
        """Whether the pod is among them, once its namespace is (see in_namespace)."""
        if self.block is not None:
            return any(ip in self.block for ip in pod.ips)
        return self.pod_selector is None or self.pod_selector.matches(pod.labels)

    def text(self) -> str:
        if self.block is not None:
            return f"block {self.block.cidr} except {' '.join(map(str, self.block.excepts))}"
        return (f"ns {self.namespace or '-'} nsel {_selector_text(self.namespace_selector)} "
                f"pods {_selector_text(self.pod_selector)}")


EVERY_POD = Peers(namespace_selector=LabelSelector())


@dataclass(frozen=True, eq=False)
class PeerSet:
    """A set of the pods `peers` names: their addresses, or with `port` (protocol, name) the address .
    protocol . port of that named port on each of them. Without `port`, an ipBlock's set is its addresses.
    Sets are the same when their meanings are (compared, and hashed, by the digest that names them)."""

    peers: Peers
    port: tuple[str, str] | None = None

    @cached_property
    def _id(self) -> str:
        return digest(f"{self.peers.text()} port {self.port}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerSet) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    @cached_property
    def tables(self) -> tuple[tuple[int, str], ...]:
        """(IP version, "inet NAME") of its nft sets."""
        return tuple((v, f"inet {self.name(v)}") for v in self.versions)

    @property
    def fixed(self) -> bool:
        """An ipBlock's addresses: no pod joins or leaves it."""
        return self.peers.block is not None and self.port is None

    @property
    def versions(self) -> tuple[int, ...]:
        return (self.peers.block.cidr.version,) if self.fixed and self.peers.block is not None else (4, 6)

    def name(self, version: int) -> str:
        prefix = "n" if self.port is not None else "b" if self.fixed else "p"
        return f"{prefix}{version}_{self._id}"

    def declaration(self, version: int) -> str:
        """The set's type and flags, as in `set NAME { ... }`."""
        addr = FAMILY[version][1]
        if self.port is not None:
            return f"type {addr} . inet_proto . inet_service;"
        return f"type {addr}; flags interval;" if self.fixed else f"type {addr};"

    def fixed_elements(self, version: int) -> list[str]:
        block = self.peers.block
        return _intervals(block.intervals).get(version, []) if self.fixed and block is not None else []

    def elements(self, pod: Pod, version: int) -> list[str]:
        """What the pod puts in the set's `version` family (once it is a member)."""
        ips = [ip for v, ip in pod.texts if v == version]
        if self.port is None:
            return [] if self.fixed else ips
        protocol, name = self.port
        return [f"{ip} . {PROTO[protocol]} . {n}" for n in pod.named_port(name, protocol) for ip in ips]


def _intervals(intervals: Iterable[tuple[int, int, int]]) -> dict[int, list[str]]:
    """nft interval-set elements per IP version, overlaps merged (nft refuses overlapping elements)."""
    by_version: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for v, first, last in intervals:
        by_version[v].append((first, last))
    out: dict[int, list[str]] = {}
    for v, ranges in by_version.items():
        merged: list[list[int]] = []
        for first, last in sorted(ranges):
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        make = ipaddress.IPv4Address if v == 4 else ipaddress.IPv6Address
        out[v] = [str(make(a)) if a == b else f"{make(a)}-{make(b)}" for a, b in merged]
    return out
