"""One node's NetworkPolicy state, compiled into one nftables ruleset applied in one transaction.

    table inet weft_policy
      forward (hook forward, sees every pod-to-pod path with br_netfilter on)
        ct established,related accept; neighbour discovery on the bridge accept; a pod to itself accept
        ip saddr vmap @egress4    -> e_<hash>: the source pod's egress rules, `return` when allowed, else drop
        ip daddr vmap @ingress4   -> i_<hash>: the destination pod's ingress rules, likewise
    table bridge weft_policy
      prerouting: a Weft veth port may send IPv4, ARP and IPv6 only from its pod's own addresses
        (IPv6 also: duplicate address detection from ::, neighbour discovery and MLD from link-local;
        never router advertisements, nor neighbour advertisements for another pod's address)

Allowed traffic `return`s from a pod chain and only the base chain's policy accepts, so a packet
allowed by the source's egress still meets the destination's ingress (kube-router#916). Pod chains
with the same rules are shared; peer sets with the same addresses are shared. Traffic between a pod
and its own node never crosses `forward` (input and output are not hooked), so it always passes.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import netaddr

from weftd.policy.model import (
    NAME_LABEL,
    ContainerPort,
    IPBlock,
    Key,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Object,
    Pod,
    PortSpec,
    Rule,
)

TABLE = "weft_policy"
SPOOFED = "spoofed"
PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
FAMILY = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}


@dataclass(frozen=True)
class PortBinding:
    """A pod's host veth and the addresses it may send from (anti-spoofing)."""

    ifname: str
    ips: tuple[netaddr.IPAddress, ...]


@dataclass
class State:
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    pods: list[Pod] = field(default_factory=list)
    policies: list[NetworkPolicy] = field(default_factory=list)

    @classmethod
    def of(cls, objects: Iterable[Object]) -> State:
        """The namespaces, pods and policies among `objects`, pods and policies in the order given."""
        state = cls()
        for obj in objects:
            if isinstance(obj, Namespace):
                state.namespaces[obj.name] = obj
            elif isinstance(obj, Pod):
                state.pods.append(obj)
            else:
                state.policies.append(obj)
        return state

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        ns = self.namespaces.get(name)
        return ns.labels if ns is not None else {NAME_LABEL: name}


@dataclass
class Compiled:
    text: str
    selected: dict[str, set[str]]  # policy "ns/name" -> local pods "ns/name" it selects
    chains: int = 0
    rules: int = 0
    sets: int = 0
    chain_policies: dict[str, set[str]] = field(default_factory=dict)  # pod chain -> policies behind it
    # The same ruleset in parts, for delta(): the named sets, counters and pod chains of table inet by name
    # (their names hash their content), and every element of the maps and sets that list pods, by key.
    objects: dict[str, str] = field(default_factory=dict)
    elements: dict[str, dict[str, str]] = field(default_factory=dict)  # "family set" -> key -> element


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _addr_sets(intervals: Iterable[tuple[int, int, int]]) -> dict[int, list[str]]:
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


class _Builder:
    def __init__(self) -> None:
        self.sets: dict[str, str] = {}  # name -> declaration
        self.chains: dict[str, list[str]] = {}

    def addr_set(self, version: int, elements: list[str]) -> str:
        return self._set(f"a{version}", f"{FAMILY[version][1]}; flags interval", elements)

    def port_set(self, version: int, elements: list[str]) -> str:
        return self._set(f"n{version}", f"{FAMILY[version][1]} . inet_proto . inet_service", elements)

    def _set(self, prefix: str, kind: str, elements: list[str]) -> str:
        """A named set of `elements` (declared once, however many rules use it); its name."""
        body = ", ".join(elements)
        name = f"{prefix}_{_h(body)}"
        if name not in self.sets:
            self.sets[name] = f"  set {name} {{ type {kind}; elements = {{ {body} }} }}\n"
        return name


class Compiler:
    def __init__(self, state: State) -> None:
        self.state = state
        self.peers = [p for p in state.pods if p.is_peer]
        self.by_namespace: dict[str, list[Pod]] = defaultdict(list)
        self._in_block: dict[IPBlock, list[Pod]] = {}
        for pod in self.peers:
            self.by_namespace[pod.namespace].append(pod)

    def in_block(self, block: IPBlock) -> list[Pod]:
        """Pods with an address in the block (ipBlock also matches pods); blocks repeat, so remembered."""
        if block not in self._in_block:
            self._in_block[block] = [p for p in self.peers if any(ip in block for ip in p.ips)]
        return self._in_block[block]

    def peer_pods(self, pol: NetworkPolicy, rule: Rule) -> list[Pod]:
        """Pods the rule's selectors name (ipBlocks are handled as addresses)."""
        out: dict[tuple[str, str], Pod] = {}
        for peer in rule.peers:
            if peer.ip_block is not None:
                continue
            if peer.namespace_selector is None:
                namespaces = [pol.namespace]
            else:
                nsel = peer.namespace_selector
                namespaces = [ns for ns in self.by_namespace if nsel.matches(self.state.namespace_labels(ns))]
            for ns in namespaces:
                for pod in self.by_namespace.get(ns, ()):
                    if peer.pod_selector is None or peer.pod_selector.matches(pod.labels):
                        out[(pod.namespace, pod.name)] = pod
        return list(out.values())

    def peer_addresses(self, pol: NetworkPolicy, rule: Rule) -> tuple[list[tuple[int, int, int]], list[Pod]]:
        """Every address the rule's peers name as (version, first, last), and the pods among them (by selector
        or by address)."""
        pods = self.peer_pods(pol, rule)
        blocks = [peer.ip_block for peer in rule.peers if peer.ip_block is not None]
        intervals = [iv for pod in pods for iv in pod.intervals]
        if blocks:
            named = {(p.namespace, p.name) for p in pods}
            for block in blocks:
                intervals += block.intervals
            pods += [p for block in blocks for p in self.in_block(block) if (p.namespace, p.name) not in named]
            pods = list({(p.namespace, p.name): p for p in pods}.values())
        return intervals, pods


RuleKey = tuple[str, str, Rule]  # namespace, direction, rule: what a rule's nft lines depend on besides pods


@dataclass(frozen=True)
class _RuleOut:
    addr: list[str | None]  # the rule's address matches (None: any)
    fixed: list[str]  # its nft rules but those of ingress named ports
    sets: tuple[tuple[str, str], ...]  # the sets they refer to (name, declaration), in the order they are made
    named: dict[tuple[ContainerPort, ...], list[str]] = field(default_factory=dict)  # by the target's ports


class Cache:
    """What one compile leaves to the next, so that a change recompiles only what it touches: a pod's ADD
    or DEL recomputes the rules that name the pod (as a peer by selector or ipBlock) and the selections of
    its namespace's policies; the rest is reused. Each entry is keyed by its inputs and dropped when a pod
    or namespace it was computed from changes, so a compile with a cache gives exactly what a compile
    without one gives (tests/unit/test_policy.py compares them)."""

    def __init__(self) -> None:
        self.namespaces: dict[str, Namespace] = {}
        self.pods: dict[Key, Pod] = {}
        self.local: dict[Key, Pod] = {}
        self.rules: dict[RuleKey, _RuleOut] = {}
        self.targets: dict[tuple[str, LabelSelector], list[Pod]] = {}
        # (direction, pod) -> its chain's parts (the line lists of its rules, kept so that their ids stay
        # theirs), the parts' ids and the NFLOG group, the chain's name and lines
        self.chains: dict[tuple[str, Key], tuple[tuple[list[str], ...], tuple[Any, ...], str, list[str]]] = {}

    def forget_changes(self, state: State, local: list[Pod]) -> None:
        """Drops what the differences between the last compile's state and `state` invalidate."""
        pods = {p.key: p for p in state.pods}
        local_by_key = {p.key: p for p in local}
        if state.namespaces != self.namespaces or len(pods) != len(state.pods):
            self.rules.clear()
            self.targets.clear()
        else:
            changed = _changed(self.pods, pods)
            if changed:
                self.rules = {k: v for k, v in self.rules.items()
                              if not any(_names(state, k, p) for p in changed)}
            moved = {p.namespace for p in _changed(self.local, local_by_key)}
            if moved:
                self.targets = {k: v for k, v in self.targets.items() if k[0] not in moved}
        self.namespaces = dict(state.namespaces)
        self.pods = pods
        self.local = local_by_key


def _changed(old: Mapping[Key, Pod], new: Mapping[Key, Pod]) -> list[Pod]:
    """The pods, in their old and their new versions, that differ between two states."""
    out = []
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if a is not b and a != b:
            out += [p for p in (a, b) if p is not None]
    return out


def _names(state: State, rk: RuleKey, pod: Pod) -> bool:
    """Whether a rule's nft lines may depend on the pod: it is a peer of the rule by selector or by address
    (a superset is fine: it only costs a recompile)."""
    namespace, direction, rule = rk
    if not pod.is_peer:
        return False
    if not rule.peers:  # every pod is a peer; only egress named ports are resolved on them
        return direction == "egress" and any(isinstance(s.port, str) for s in rule.ports)
    for peer in rule.peers:
        if peer.ip_block is not None:
            if any(ip in peer.ip_block for ip in pod.ips):
                return True
            continue
        nsel = peer.namespace_selector
        in_ns = pod.namespace == namespace if nsel is None else nsel.matches(state.namespace_labels(pod.namespace))
        if in_ns and (peer.pod_selector is None or peer.pod_selector.matches(pod.labels)):
            return True
    return False


def _port_match(specs: Iterable[PortSpec]) -> list[str]:
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


def compile_ruleset(state: State, local: list[Pod], bindings: list[PortBinding],
                    nflog_group: int | None = None, cache: Cache | None = None) -> Compiled:
    """The node's ruleset. With `nflog_group`, denied packets also go to that NFLOG group (at most 20 a
    second per pod chain), prefixed with the chain's name. With `cache` (the same one every time), what
    the last compile computed and the changes since leave untouched is reused; the result is the same."""
    c = Compiler(state)
    b = _Builder()
    rules_of: dict[tuple[str, Key], list[list[str]]] = {}  # a pod chain's rules, as the rules' line lists
    policies_of: dict[tuple[str, Key], set[str]] = defaultdict(set)
    by_key = {p.key: p for p in local}
    selected: dict[str, set[str]] = {}
    memo: dict[RuleKey, _RuleOut] = {}  # the rules of this compile, each made (or taken from the cache) once
    targets_of: dict[tuple[str, LabelSelector], list[Pod]] = {}
    seen: set[netaddr.IPAddress] = set()
    unique = []
    for pod in local:  # an address belongs to one pod: the first claim wins
        if pod.is_peer and not any(ip in seen for ip in pod.ips):
            seen.update(pod.ips)
            unique.append(pod)
    local = unique
    if cache is not None:
        cache.forget_changes(state, local)
    local_by_ns: dict[str, list[Pod]] = defaultdict(list)
    for pod in local:
        local_by_ns[pod.namespace].append(pod)
    for pol in sorted(state.policies, key=lambda p: (p.namespace, p.name)):
        pid = f"{pol.namespace}/{pol.name}"
        sel = (pol.namespace, pol.pod_selector)
        if sel not in targets_of:
            kept = cache.targets.get(sel) if cache is not None else None
            targets_of[sel] = kept if kept is not None else \
                [p for p in local_by_ns.get(pol.namespace, ()) if pol.pod_selector.matches(p.labels)]
        targets = targets_of[sel]
        selected[pid] = {f"{p.namespace}/{p.name}" for p in targets}
        for direction, rules in (("ingress", pol.ingress), ("egress", pol.egress)):
            if direction.capitalize() not in pol.policy_types:
                continue
            for pod in targets:
                rules_of.setdefault((direction, pod.key), [])
                policies_of[(direction, pod.key)].add(pid)
            for rule in rules:
                # Everything but ingress named ports is the same for every target, and for the same rule in
                # another policy of the namespace: build it once.
                memo_key = (pol.namespace, direction, rule)
                if memo_key not in memo:
                    out = cache.rules.get(memo_key) if cache is not None else None
                    if out is None:
                        made = _Builder()
                        addr, fixed = _rule(c, made, pol, rule, direction)
                        out = _RuleOut(addr, fixed, tuple(made.sets.items()))
                    for name, decl in out.sets:
                        b.sets.setdefault(name, decl)
                    memo[memo_key] = out
                out = memo[memo_key]
                named = [s for s in rule.ports if isinstance(s.port, str)] if direction == "ingress" else []
                for pod in targets:
                    lines = out.fixed
                    if named:  # resolved on the target pod, the one this chain protects
                        lines = out.named.get(pod.ports)  # type: ignore[assignment]
                        if lines is None:
                            resolved = [PortSpec(s.protocol, n) for s in named
                                        for n in pod.named_port(str(s.port), s.protocol)]
                            lines = out.named[pod.ports] = out.fixed + [
                                " ".join(x for x in (a, p, "return") if x) for a in out.addr
                                for p in _port_match(resolved)]
                    rules_of[(direction, pod.key)].append(lines)
    vmaps: dict[str, dict[int, list[str]]] = {"ingress": defaultdict(list), "egress": defaultdict(list)}
    chain_policies: dict[str, set[str]] = defaultdict(set)
    chains: dict[tuple[str, Key], tuple[tuple[list[str], ...], tuple[Any, ...], str, list[str]]] = {}
    for (direction, key), body in sorted(rules_of.items()):
        pod = by_key[key]
        parts = tuple(body)
        ids = (nflog_group, *map(id, parts))  # the lists are never changed once made
        prior = cache.chains.get((direction, key)) if cache is not None else None
        if prior is not None and prior[1] == ids:
            name, chain = prior[2], prior[3]
        else:
            lines = ["ct state invalid drop"]
            if direction == "ingress":
                lines.append("fib saddr type local return")  # the node itself, e.g. after a hairpin masquerade
            lines += dict.fromkeys(x for part in parts for x in part)
            name = f"{direction[0]}_{_h(chr(10).join(lines))}"
            log = [f'limit rate 20/second burst 20 packets log prefix "{name}" group {nflog_group}'] \
                if nflog_group is not None else []
            chain = [*lines, *log, f'counter name "{name}" drop']
        chains[(direction, key)] = (parts, ids, name, chain)
        b.chains.setdefault(name, chain)
        chain_policies[name] |= policies_of[(direction, key)]
        for v, ip in pod.texts:
            vmaps[direction][v].append(f"{ip} : jump {name}")
    if cache is not None:  # what this compile did not use is not kept
        cache.rules, cache.targets, cache.chains = memo, targets_of, chains
    objects = {**b.sets, **{name: f"  counter {name} {{ }}\n  chain {name} {{\n" + "".join(f"    {x}\n" for x in lines)
                            + "  }\n" for name, lines in b.chains.items()}}
    elements = _element_sets(vmaps, local, bindings)
    text = _render(objects, elements)
    nrules = sum(map(len, b.chains.values())) + len(BASE_RULES) + len(BRIDGE_RULES)
    return Compiled(text, selected, len(b.chains), nrules, len(b.sets), dict(chain_policies), objects, elements)


def _rule(c: Compiler, b: _Builder, pol: NetworkPolicy, rule: Rule,
          direction: str) -> tuple[list[str | None], list[str]]:
    """The address matches of a policy rule (None: any), and its nft rules (ending in `return`) for
    everything but ingress named ports."""
    field_ = "saddr" if direction == "ingress" else "daddr"
    addr: list[str | None] = [None]
    addrs, pods = None, c.peers
    if rule.peers:
        addrs, pods = c.peer_addresses(pol, rule)
        addr = [f"{FAMILY[v][0]} {field_} @{b.addr_set(v, els)}" for v, els in sorted(_addr_sets(addrs).items())]
    out: list[str] = []
    ports: list[str | None] = [None]  # any port and protocol
    if rule.ports:
        ports = list(_port_match(s for s in rule.ports if not isinstance(s.port, str)))
        named = [s for s in rule.ports if isinstance(s.port, str)]
        if named and direction == "egress":
            out += _egress_named(b, named, pods)
    out += [" ".join(x for x in (a, p, "return") if x) for a in addr for p in ports]
    return addr, out


def _egress_named(b: _Builder, named: list[PortSpec], pods: list[Pod]) -> list[str]:
    """Egress to a named port: resolved on each destination pod, as address . protocol . port."""
    elements: dict[int, set[str]] = defaultdict(set)
    for pod in pods:
        for spec in named:
            for number in pod.named_port(str(spec.port), spec.protocol):
                for ip in pod.ips:
                    elements[ip.version].add(f"{ip} . {PROTO[spec.protocol]} . {number}")
    return [f"{FAMILY[v][0]} daddr . meta l4proto . th dport @{b.port_set(v, sorted(els))} return"
            for v, els in sorted(elements.items())]


BASE_RULES = (
    "ct state established,related accept",
    # Neighbour discovery between pods on one bridge: conntrack leaves it untracked (invalid to the pod
    # chains), and hop limit 255 proves it was not routed (RFC 4861 7.1).
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
    "ip saddr . ip daddr @self4 accept", "ip6 saddr . ip6 daddr @self6 accept",
    "ip saddr vmap @egress4", "ip6 saddr vmap @egress6",
    "ip daddr vmap @ingress4", "ip6 daddr vmap @ingress6")
MAPS = tuple(f"{d}{v}" for d in ("egress", "ingress") for v in (4, 6))


def _element_sets(vmaps: dict[str, dict[int, list[str]]], local: list[Pod],
                  bindings: list[PortBinding]) -> dict[str, dict[str, str]]:
    """The elements of every map and set that lists pods, by key (a map element's key is its address)."""
    out = {f"inet {direction}{v}": {e.partition(" : ")[0]: e for e in vmaps[direction].get(v, ())}
           for direction in ("egress", "ingress") for v in (4, 6)}
    for v in (4, 6):
        out[f"inet self{v}"] = {e: e for e in (f"{ip} . {ip}" for pod in local for w, ip in pod.texts if w == v)}
    bridge = {"ports": (f'"{bd.ifname}"' for bd in bindings),
              "own4": (f'"{bd.ifname}" . {ip}' for bd in bindings for ip in bd.ips if ip.version == 4),
              "own6": (f'"{bd.ifname}" . {ip}' for bd in bindings for ip in bd.ips if ip.version == 6),
              "target6": (f'"{bd.ifname}" . {int(ip):#034x}' for bd in bindings for ip in bd.ips if ip.version == 6)}
    for name, items in bridge.items():
        out[f"bridge {name}"] = {e: e for e in sorted(set(items))}
    return out


def _body(elements: Mapping[str, str]) -> str:
    return f" elements = {{ {', '.join(elements.values())} }}" if elements else ""


def _render(objects: Mapping[str, str], elements: Mapping[str, Mapping[str, str]]) -> str:
    out = [f"table inet {TABLE} {{\n"]
    out += [decl for name, decl in objects.items() if name[0] in "an"]  # sets first: the chains refer to them
    out += [f"  map {m} {{ type {FAMILY[int(m[-1])][1]} : verdict;{_body(elements[f'inet {m}'])} }}\n" for m in MAPS]
    out += [f"  set self{v} {{ type {FAMILY[v][1]} . {FAMILY[v][1]};{_body(elements[f'inet self{v}'])} }}\n"
            for v in (4, 6)]
    out += [decl for name, decl in objects.items() if name[0] in "ie"]
    out.append("  chain forward {\n    type filter hook forward priority filter - 5; policy accept;\n"
               + "".join(f"    {x}\n" for x in BASE_RULES) + "  }\n}\n")
    out.append(_bridge_table(elements))
    return "".join(out)


# What a pod may send over IPv6 before, or besides, its own address (RFC 4861, 4862, 3810): duplicate
# address detection and MLD reports from ::, neighbour discovery and MLD from its link-local address.
# Nothing else from link-local: bridged link-local traffic between pods would bypass every policy.
ND_FROM_UNSPECIFIED = "nd-neighbor-solicit, mld2-listener-report"
ND_FROM_LINK_LOCAL = ("nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, "
                      "mld-listener-done, mld2-listener-report")
BRIDGE_RULES = (
    "iifname != @ports return",
    # IPv4 and ARP only from the pod's address; 0.0.0.0: an ARP probe (RFC 5227) claims nothing
    f'ether type ip iifname . ip saddr != @own4 counter name "{SPOOFED}" drop',
    f'ether type arp arp saddr ip != 0.0.0.0 iifname . arp saddr ip != @own4 counter name "{SPOOFED}" drop',
    # a pod is no router: no router advertisements or redirects
    f'ether type ip6 icmpv6 type {{ nd-router-advert, nd-redirect }} counter name "{SPOOFED}" drop',
    f"ether type ip6 ip6 saddr :: icmpv6 type {{ {ND_FROM_UNSPECIFIED} }} return",
    # a neighbour advertisement claims its target address (the ARP reply of IPv6): own or link-local
    f'ether type ip6 icmpv6 type nd-neighbor-advert @th,64,16 & 0xffc0 != 0xfe80 '
    f'iifname . @th,64,128 != @target6 counter name "{SPOOFED}" drop',
    f"ether type ip6 ip6 saddr fe80::/10 icmpv6 type {{ {ND_FROM_LINK_LOCAL} }} return",
    f'ether type ip6 iifname . ip6 saddr != @own6 counter name "{SPOOFED}" drop',
)


def _bridge_table(elements: Mapping[str, Mapping[str, str]]) -> str:
    """Anti-spoofing on every Weft veth port: a pod sends only from its own addresses."""
    e = {name: _body(elements[f"bridge {name}"]) for name in ("ports", "own4", "own6", "target6")}
    return (f"table bridge {TABLE} {{\n"
            f"  set ports {{ type ifname;{e['ports']} }}\n"
            f"  set own4 {{ type ifname . ipv4_addr;{e['own4']} }}\n"
            f"  set own6 {{ type ifname . ipv6_addr;{e['own6']} }}\n"
            f"  set target6 {{ typeof iifname . @th,64,128;{e['target6']} }}\n"
            f"  counter {SPOOFED} {{ }}\n"
            "  chain prerouting {\n    type filter hook prerouting priority -300; policy accept;\n"
            + "".join(f"    {r}\n" for r in BRIDGE_RULES) + "  }\n}\n")


def transaction(text: str) -> str:
    """Replace both tables in one transaction: never a moment with a partial or missing ruleset."""
    return (f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n" + text)


@dataclass(frozen=True)
class Delta:
    """What turns tables holding `old` into tables holding `new`, as one nftables transaction."""

    commands: str
    removed: frozenset[str]  # pod chains (and their counters) it deletes
    reset: frozenset[str]  # pod chains kept whose counters it resets: the policies behind them changed


def delta(old: Compiled, new: Compiled) -> Delta | None:
    """The changes from `old` to `new` alone: sets and pod chains made and deleted, map and set elements
    added and removed; the base chains stay. None if `old` and `new` differ otherwise. Names hash content,
    so a name in both is the same object; a pod whose chain changes gets its map element replaced."""
    if old.elements.keys() != new.elements.keys() \
            or any(old.objects[n] != new.objects[n] for n in old.objects.keys() & new.objects.keys()):
        return None
    made = [decl for name, decl in new.objects.items() if name not in old.objects]
    gone = [name for name in old.objects if name not in new.objects]
    out = [f"table inet {TABLE} {{\n" + "".join(made) + "}\n"] if made else []
    adds = []
    for where, now in new.elements.items():
        was = old.elements[where]
        family, _, name = where.partition(" ")
        where = f"{family} {TABLE} {name}"
        drop = [k for k, e in was.items() if now.get(k) != e]
        add = [e for k, e in now.items() if was.get(k) != e]
        if drop:
            out.append(f"delete element {where} {{ {', '.join(drop)} }}\n")
        if add:
            adds.append(f"add element {where} {{ {', '.join(add)} }}\n")
    out += adds
    chains = [n for n in gone if n[0] in "ie"]
    out += [f"delete chain inet {TABLE} {n}\ndelete counter inet {TABLE} {n}\n" for n in chains]
    out += [f"delete set inet {TABLE} {n}\n" for n in gone if n[0] in "an"]
    reset = [n for n in new.chain_policies.keys() & old.chain_policies.keys()
             if new.chain_policies[n] != old.chain_policies[n]]
    out += [f"reset counter inet {TABLE} {n}\n" for n in sorted(reset)]
    return Delta("".join(out), frozenset(chains), frozenset(reset))
