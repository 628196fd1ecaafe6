"""Pod chains: a policy rule as nft rules over peer sets, and the chain of a pod from the rules of the
policies selecting it.

A rule's nft rules depend on its policy's namespace, its direction and itself; only ingress named ports
depend on the pod it protects (they resolve on it). They refer to peer sets by name, so they never change
with the pods in those sets. A pod chain's name hashes its rules and the policies behind it: pods selected
by the same policies share one chain, and a chain's drop counter always counts for the same policies.
Allowed traffic `return`s; the chain ends in a counted drop, so a packet allowed by the source's egress still
meets the destination's ingress (kube-router#916).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from weftd.policy.layout import FAMILY, PROTO
from weftd.policy.model import Pod, PortSpec, Rule
from weftd.policy.peersets import EVERY_POD, Peers, PeerSet, digest


def port_match(specs: Iterable[PortSpec]) -> list[str]:
    """nft matches for numeric ports and whole protocols, one per protocol."""
    by_proto: dict[str, list[str]] = defaultdict(list)
    whole: set[str] = set()
    for spec in specs:
        proto = PROTO[spec.protocol]
        if spec.port is None:
            whole.add(proto)
        elif isinstance(spec.port, int):
            by_proto[proto].append(f"{spec.port}-{spec.end_port}" if spec.end_port and spec.end_port != spec.port
                                   else str(spec.port))
    out = [f"meta l4proto {p}" for p in sorted(whole)]
    for proto, ports in sorted(by_proto.items()):
        if proto not in whole:
            out.append(f"meta l4proto {proto} th dport {{ {', '.join(sorted(set(ports)))} }}")
    return out


def _join(*parts: str | None) -> str:
    return " ".join(x for x in (*parts, "return") if x)


@dataclass(frozen=True)
class RuleLines:
    """One policy rule as nft rules."""

    fixed: tuple[str, ...]  # the same for every pod it protects
    addr: tuple[str | None, ...]  # its address matches (None: any), for ingress named ports
    named: tuple[PortSpec, ...]  # ingress named ports, resolved on the pod it protects
    sets: tuple[PeerSet, ...]  # the peer sets it refers to

    def for_pod(self, pod: Pod) -> tuple[str, ...]:
        if not self.named:
            return self.fixed
        resolved = [PortSpec(s.protocol, n) for s in self.named for n in pod.named_port(str(s.port), s.protocol)]
        return self.fixed + tuple(_join(a, p) for a in self.addr for p in port_match(resolved))


def rule_lines(namespace: str, direction: str, rule: Rule) -> RuleLines:
    """A rule of a policy in `namespace`, for `direction` ("ingress" or "egress")."""
    field_ = "saddr" if direction == "ingress" else "daddr"
    ports: list[str | None] = [None]  # any port and protocol
    named = [s for s in rule.ports if isinstance(s.port, str)]
    if rule.ports:
        ports = list(port_match(s for s in rule.ports if not isinstance(s.port, str)))
    sets: list[PeerSet] = []
    addr: list[str | None] = [None]
    if rule.peers:
        addr = []
        for peer in rule.peers:
            s = PeerSet(Peers.of(namespace, peer))
            addr += [f"{FAMILY[v][0]} {field_} @{s.name(v)}" for v in s.versions]
            if ports or direction == "ingress":  # else only egress named ports, below, refer to the peers
                sets.append(s)
    out: list[str] = []
    if named and direction == "egress":  # resolved on each destination pod, in a set of its own
        for peers in [Peers.of(namespace, p) for p in rule.peers] or [EVERY_POD]:
            for spec in named:
                s = PeerSet(peers, (spec.protocol, str(spec.port)))
                sets.append(s)
                out += [f"{FAMILY[v][0]} daddr . meta l4proto . th dport @{s.name(v)} return" for v in s.versions]
        named = []
    out += [_join(a, p) for a in addr for p in ports]
    return RuleLines(tuple(out), tuple(addr), tuple(named), tuple(dict.fromkeys(sets)))


def pod_chain(direction: str, rules: Iterable[Iterable[str]], policies: Iterable[str],
              nflog_group: int | None) -> tuple[str, tuple[str, ...]]:
    """The name and rules of a pod chain: `rules` (as the policies' rules give them, repeats dropped), behind
    the policies `policies`. With `nflog_group`, what it drops also goes to that NFLOG group (at most 20
    packets a second per chain), prefixed with the chain's name."""
    lines = ["ct state invalid drop"]
    if direction == "ingress":
        lines.append("fib saddr type local return")  # the node itself, e.g. after a hairpin masquerade
    lines += dict.fromkeys(x for part in rules for x in part)
    name = f"{direction[0]}_{digest(chr(10).join([*lines, '#', *sorted(policies)]))}"
    log = [f'limit rate 20/second burst 20 packets log prefix "{name}" group {nflog_group}'] \
        if nflog_group is not None else []
    return name, (*lines, *log, f'counter name "{name}" drop')
