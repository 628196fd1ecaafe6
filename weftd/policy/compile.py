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

import netaddr

from weftd.policy.model import NAME_LABEL, IPBlock, Key, Namespace, NetworkPolicy, Object, Pod, PortSpec, Rule

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
        intervals = [(ip.version, int(ip), int(ip)) for pod in pods for ip in pod.ips]
        if blocks:
            named = {(p.namespace, p.name) for p in pods}
            for block in blocks:
                intervals += block.intervals
            pods += [p for block in blocks for p in self.in_block(block) if (p.namespace, p.name) not in named]
            pods = list({(p.namespace, p.name): p for p in pods}.values())
        return intervals, pods


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
                    nflog_group: int | None = None) -> Compiled:
    """The node's ruleset. With `nflog_group`, denied packets also go to that NFLOG group (at most 20 a
    second per pod chain), prefixed with the chain's name."""
    c = Compiler(state)
    b = _Builder()
    rules_of: dict[tuple[str, Key], list[str]] = {}
    policies_of: dict[tuple[str, Key], set[str]] = defaultdict(set)
    by_key = {p.key: p for p in local}
    selected: dict[str, set[str]] = {}
    memo: dict[tuple[str, str, Rule], tuple[list[str | None], list[str]]] = {}
    seen: set[netaddr.IPAddress] = set()
    unique = []
    for pod in local:  # an address belongs to one pod: the first claim wins
        if pod.is_peer and not any(ip in seen for ip in pod.ips):
            seen.update(pod.ips)
            unique.append(pod)
    local = unique
    local_by_ns: dict[str, list[Pod]] = defaultdict(list)
    for pod in local:
        local_by_ns[pod.namespace].append(pod)
    for pol in sorted(state.policies, key=lambda p: (p.namespace, p.name)):
        pid = f"{pol.namespace}/{pol.name}"
        targets = [p for p in local_by_ns.get(pol.namespace, ()) if pol.pod_selector.matches(p.labels)]
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
                    memo[memo_key] = _rule(c, b, pol, rule, direction)
                addr, fixed = memo[memo_key]
                named = [s for s in rule.ports if isinstance(s.port, str)] if direction == "ingress" else []
                for pod in targets:
                    lines = fixed
                    if named:  # resolved on the target pod, the one this chain protects
                        resolved = [PortSpec(s.protocol, n) for s in named
                                    for n in pod.named_port(str(s.port), s.protocol)]
                        lines = fixed + [" ".join(x for x in (a, p, "return") if x)
                                         for a in addr for p in _port_match(resolved)]
                    rules_of[(direction, pod.key)] += lines
    vmaps: dict[str, dict[int, list[str]]] = {"ingress": defaultdict(list), "egress": defaultdict(list)}
    chain_policies: dict[str, set[str]] = defaultdict(set)
    for (direction, key), body in sorted(rules_of.items()):
        pod = by_key[key]
        lines = ["ct state invalid drop"]
        if direction == "ingress":
            lines.append("fib saddr type local return")  # the node itself, e.g. after a hairpin masquerade
        lines += dict.fromkeys(body)
        name = f"{direction[0]}_{_h(chr(10).join(lines))}"
        log = [f'limit rate 20/second burst 20 packets log prefix "{name}" group {nflog_group}'] \
            if nflog_group is not None else []
        b.chains.setdefault(name, [*lines, *log, f'counter name "{name}" drop'])
        chain_policies[name] |= policies_of[(direction, key)]
        for ip in pod.ips:
            vmaps[direction][ip.version].append(f"{ip} : jump {name}")
    text, nrules = _render(b, vmaps, local, bindings)
    return Compiled(text, selected, len(b.chains), nrules, len(b.sets), dict(chain_policies))


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


def _render(b: _Builder, vmaps: dict[str, dict[int, list[str]]], local: list[Pod],
            bindings: list[PortBinding]) -> tuple[str, int]:
    out = [f"table inet {TABLE} {{\n"]
    out += b.sets.values()
    for direction in ("egress", "ingress"):
        for v in (4, 6):
            els = vmaps[direction].get(v)
            body = f" elements = {{ {', '.join(els)} }}" if els else ""
            out.append(f"  map {direction}{v} {{ type {FAMILY[v][1]} : verdict;{body} }}\n")
    selfs: dict[int, list[str]] = defaultdict(list)
    for pod in local:
        for ip in pod.ips:
            selfs[ip.version].append(f"{ip} . {ip}")
    for v in (4, 6):
        body = f" elements = {{ {', '.join(selfs[v])} }}" if selfs[v] else ""
        out.append(f"  set self{v} {{ type {FAMILY[v][1]} . {FAMILY[v][1]};{body} }}\n")
    nrules = 0
    for name, lines in b.chains.items():
        out.append(f"  counter {name} {{ }}\n  chain {name} {{\n" + "".join(f"    {x}\n" for x in lines) + "  }\n")
        nrules += len(lines)
    base = ["ct state established,related accept",
            # Neighbour discovery between pods on one bridge: conntrack leaves it untracked (invalid to
            # the pod chains), and hop limit 255 proves it was not routed (RFC 4861 7.1).
            "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
            "ip saddr . ip daddr @self4 accept", "ip6 saddr . ip6 daddr @self6 accept",
            "ip saddr vmap @egress4", "ip6 saddr vmap @egress6",
            "ip daddr vmap @ingress4", "ip6 daddr vmap @ingress6"]
    out.append("  chain forward {\n    type filter hook forward priority filter - 5; policy accept;\n"
               + "".join(f"    {x}\n" for x in base) + "  }\n}\n")
    nrules += len(base)
    out.append(_bridge_table(bindings))
    return "".join(out), nrules + len(BRIDGE_RULES)


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


def _elements(items: Iterable[str]) -> str:
    items = sorted(set(items))
    return f" elements = {{ {', '.join(items)} }}" if items else ""


def _bridge_table(bindings: list[PortBinding]) -> str:
    """Anti-spoofing on every Weft veth port: a pod sends only from its own addresses."""
    ports = _elements(f'"{bd.ifname}"' for bd in bindings)
    own = {v: _elements(f'"{bd.ifname}" . {ip}' for bd in bindings for ip in bd.ips if ip.version == v)
           for v in (4, 6)}
    target6 = _elements(f'"{bd.ifname}" . {int(ip):#034x}' for bd in bindings for ip in bd.ips if ip.version == 6)
    return (f"table bridge {TABLE} {{\n"
            f"  set ports {{ type ifname;{ports} }}\n"
            f"  set own4 {{ type ifname . ipv4_addr;{own[4]} }}\n"
            f"  set own6 {{ type ifname . ipv6_addr;{own[6]} }}\n"
            f"  set target6 {{ typeof iifname . @th,64,128;{target6} }}\n"
            f"  counter {SPOOFED} {{ }}\n"
            "  chain prerouting {\n    type filter hook prerouting priority -300; policy accept;\n"
            + "".join(f"    {r}\n" for r in BRIDGE_RULES) + "  }\n}\n")


def transaction(text: str) -> str:
    """Replace both tables in one transaction: never a moment with a partial or missing ruleset."""
    return (f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n" + text)
