"""The node's policy ruleset, kept current object by object, with the nftables commands each change needs.

What it indexes, so that a change costs what it touches and not the cluster's size:
- per pod, the peer sets it is in; per peer set, its members (and the count of each element, as stale
  objects may share an address); the peer sets by namespace (a pod selector in one namespace), namespace
  selector and ipBlock, so that a pod only meets the sets that may hold it;
- per namespace, its policies; per policy, its rules as nft rules (chains.rule_lines) and the peer sets they
  refer to (a set lives while a policy refers to it);
- the node's own pods, each with its chains (shared by pods behind the same policies) and map elements.

A remote pod's change is element changes of the sets it leaves and joins. A local pod's is those, plus its own
map and `self` elements and, if no pod uses its chain yet, that chain. A policy's change redoes its own sets and
the chains of the node's pods in its namespace. flush() turns what changed since the last flush into one
transaction; render() gives the whole ruleset, for a replace of both tables.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weftd.policy.chains import RuleLines, pod_chain, rule_lines
from weftd.policy.layout import (
    BASE_RULES,
    BRIDGE_RULES,
    BRIDGE_SETS,
    POD_SETS,
    TABLE,
    PortBinding,
    body,
    bridge_elements,
    bridge_table,
    forward_chain,
)
from weftd.policy.model import NAME_LABEL, Key, NetworkPolicy, Pod
from weftd.policy.peersets import PeerSet
from weftlib.kernel.nftelements import Elements

DIRECTIONS = ("ingress", "egress")


@dataclass
class Chain:
    lines: tuple[str, ...]
    policies: frozenset[str]  # "ns/name" of the policies behind it
    users: int = 0  # (direction, pod) using it


@dataclass(frozen=True)
class Change:
    """One transaction's commands, and the pod chains it deletes, with the policies that were behind each.
    Their counters stay, so that nothing needs reading them first (listing a counter costs a dump of the whole
    table, set elements included): they go with the next full replace, which reads every counter first."""

    commands: str
    removed: dict[str, frozenset[str]] = field(default_factory=dict)
    # The same change when it only adds and deletes elements (no set or chain made or deleted): per set, in order.
    elements: tuple[Elements, ...] | None = None


def _chain_text(name: str, lines: Iterable[str]) -> str:
    return f"  counter {name} {{ }}\n  chain {name} {{\n" + "".join(f"    {x}\n" for x in lines) + "  }\n"


class Ruleset:
    def __init__(self, nflog_group: int | None = None) -> None:
        self.nflog_group = nflog_group
        self.namespaces: dict[str, Mapping[str, str]] = {}  # labels of the namespaces with an object
        self.pods: dict[Key, Pod] = {}
        self._peers_by_ns: dict[str, dict[Key, Pod]] = defaultdict(dict)  # pods that can be peers
        self.policies: dict[Key, NetworkPolicy] = {}
        self._policies_by_ns: dict[str, dict[Key, NetworkPolicy]] = defaultdict(dict)
        self._rules: dict[Key, dict[str, tuple[RuleLines, ...]]] = {}
        # peer sets
        self._refs: dict[PeerSet, int] = {}
        self._scoped: dict[str, set[PeerSet]] = defaultdict(set)  # of a pod selector in one namespace
        self._wide: set[PeerSet] = set()  # of a namespace selector
        self._blocks: set[PeerSet] = set()  # named ports of the pods in an ipBlock
        self._wide_in: dict[str, list[PeerSet]] = {}  # namespace -> the _wide sets its labels let in
        self._member_of: dict[Key, set[PeerSet]] = {}
        self._members: dict[PeerSet, set[Key]] = {}
        # every set and map: "family name" -> element key (a map's: its address) -> (element, count)
        self._elements: dict[str, dict[str, tuple[str, int]]] = {
            **{f"inet {name}": {} for name in POD_SETS}, **{f"bridge {name}": {} for name in BRIDGE_SETS}}
        self._declared: dict[str, str] = {}  # peer set -> its type
        self._ports: dict[str, PortBinding] = {}  # the node's pod veths, by name
        # the node's pods: candidates, and those enforced (an address belongs to the first pod claiming it)
        self._candidates: dict[Key, Pod] = {}
        self._claims: dict[str, set[Key]] = defaultdict(set)
        self._enforced: dict[Key, Pod] = {}
        self._enforced_by_ns: dict[str, set[Key]] = defaultdict(set)
        self._pod_chain: dict[tuple[str, Key], str] = {}
        self._pod_policies: dict[Key, frozenset[str]] = {}
        self.chains: dict[str, Chain] = {}
        self.selected: dict[str, set[str]] = defaultdict(set)  # policy -> the node's pods it selects
        self.chain_lines = 0
        # since the last flush
        self._touched: dict[str, dict[str, str | None]] = defaultdict(dict)  # element key -> element before
        self._made: set[str] = set()  # sets and chains
        self._unused_chains: set[str] = set()
        self._unused_sets: set[PeerSet] = set()
        self.described: set[str] = set()  # policies whose definition or selection changed

    # ---- elements ----

    def _touch(self, where: str, key: str) -> None:
        touched = self._touched[where]
        if key not in touched:
            cur = self._elements[where].get(key)
            touched[key] = cur[0] if cur is not None else None

    def _count(self, where: str, element: str, delta: int) -> None:
        """One member more (or fewer) has `element` in set `where`."""
        els = self._elements[where]
        cur = els.get(element)
        n = (cur[1] if cur is not None else 0) + delta
        if n > 0 and cur is not None:
            els[element] = (element, n)
            return
        self._touch(where, element)
        if n > 0:
            els[element] = (element, n)
        else:
            els.pop(element, None)

    def _put(self, where: str, key: str, element: str | None) -> None:
        els = self._elements[where]
        cur = els.get(key)
        if (cur[0] if cur is not None else None) == element:
            return
        self._touch(where, key)
        if element is None:
            del els[key]
        else:
            els[key] = (element, 1)

    # ---- peer sets ----

    def _ns_labels(self, namespace: str) -> Mapping[str, str]:
        labels = self.namespaces.get(namespace)
        return labels if labels is not None else {NAME_LABEL: namespace}

    def _wide_for(self, namespace: str) -> list[PeerSet]:
        found = self._wide_in.get(namespace)
        if found is None:
            labels = self._ns_labels(namespace)
            found = self._wide_in[namespace] = [s for s in self._wide if s.peers.in_namespace(namespace, labels)]
        return found

    def _sets_of(self, pod: Pod) -> set[PeerSet]:
        if not pod.is_peer:
            return set()
        out: set[PeerSet] = set()
        seen: dict[int, bool] = {}  # by selector: many sets share one
        for group in (self._scoped.get(pod.namespace, ()), self._wide_for(pod.namespace)):
            for s in group:
                sel = s.peers.pod_selector
                if sel is None:
                    out.add(s)
                    continue
                hit = seen.get(id(sel))
                if hit is None:
                    hit = seen[id(sel)] = sel.matches(pod.labels)
                if hit:
                    out.add(s)
        out.update(s for s in self._blocks if s.peers.selects(pod))
        return out

    def _join(self, pod: Pod, sets: Iterable[PeerSet], delta: int) -> None:
        """The pod joins (delta 1) or leaves (-1) the sets."""
        for s in sets:
            members = self._members[s]
            if delta > 0:
                members.add(pod.key)
            else:
                members.discard(pod.key)
            for v, where in s.tables:
                for element in s.elements(pod, v):
                    self._count(where, element, delta)

    def _ref(self, s: PeerSet) -> None:
        if s in self._refs:
            self._refs[s] += 1
            return
        self._refs[s] = 1
        for v in s.versions:
            where, name = f"inet {s.name(v)}", s.name(v)
            self._elements[where] = {}
            self._declared[name] = s.declaration(v)
            self._made.add(name)
            for element in s.fixed_elements(v):
                self._count(where, element, 1)
        if s.fixed:
            return
        self._members[s] = set()
        peers = s.peers
        if peers.block is not None:
            self._blocks.add(s)
            scope = list(self._peers_by_ns)
        elif peers.namespace is not None:
            self._scoped[peers.namespace].add(s)
            scope = [peers.namespace]
        else:
            self._wide.add(s)
            self._wide_in.clear()
            scope = [ns for ns in self._peers_by_ns if peers.in_namespace(ns, self._ns_labels(ns))]
        for ns in scope:
            for key, pod in self._peers_by_ns.get(ns, {}).items():
                if peers.selects(pod):
                    self._member_of.setdefault(key, set()).add(s)
                    self._join(pod, (s,), 1)

    def _unref(self, s: PeerSet) -> None:
        self._refs[s] -= 1
        if not self._refs[s]:
            self._unused_sets.add(s)  # dropped at the flush, unless a policy refers to it again by then

    def _drop_set(self, s: PeerSet) -> list[str]:
        """Forgets an unreferenced set; the names of its nft sets."""
        del self._refs[s]
        for key in self._members.pop(s, ()):
            self._member_of[key].discard(s)
        self._blocks.discard(s)
        self._wide.discard(s)
        self._wide_in.clear()
        if s.peers.namespace is not None:
            self._scoped[s.peers.namespace].discard(s)
        names = [s.name(v) for v in s.versions]
        for name in names:
            del self._elements[f"inet {name}"], self._declared[name]
            self._touched.pop(f"inet {name}", None)
        return names

    # ---- objects ----

    def put_namespace(self, name: str, labels: Mapping[str, str] | None) -> None:
        """A namespace's labels (None: it has no object, and just its name label)."""
        before = self._wide_for(name)
        if labels is None:
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = dict(labels)
        self._wide_in.pop(name, None)
        after = self._wide_for(name)
        changed = set(before) ^ set(after)
        if not changed:
            return
        for key, pod in self._peers_by_ns.get(name, {}).items():
            member_of = self._member_of.setdefault(key, set())
            for s in changed:
                now = s in after and s.peers.selects(pod)
                if now != (s in member_of):
                    (member_of.add if now else member_of.discard)(s)
                    self._join(pod, (s,), 1 if now else -1)

    def put_pod(self, pod: Pod, local: bool) -> None:
        """A pod as the node sees it; `local`: one of the node's own."""
        key = pod.key
        old = self.pods.get(key)
        if old is not None and old == pod and (key in self._candidates) == local:
            return
        self._forget_pod(key)
        self.pods[key] = pod
        if pod.is_peer:
            self._peers_by_ns[pod.namespace][key] = pod
            sets = self._sets_of(pod)
            if sets:
                self._member_of[key] = sets
                self._join(pod, sets, 1)
        self._candidate(key, pod if local and pod.is_peer else None)

    def remove_pod(self, key: Key) -> None:
        if key in self.pods:
            self._forget_pod(key)
            self._candidate(key, None)

    def _forget_pod(self, key: Key) -> None:
        old = self.pods.pop(key, None)
        if old is None:
            return
        self._join(old, self._member_of.pop(key, ()), -1)
        if old.is_peer:
            del self._peers_by_ns[old.namespace][key]

    def put_policy(self, pol: NetworkPolicy) -> None:
        key = pol.key
        old = self.policies.get(key)
        if old == pol:
            return
        rules = {d: tuple(rule_lines(pol.namespace, d, r) for r in rs)
                 for d, rs in (("ingress", pol.ingress), ("egress", pol.egress)) if d.capitalize() in pol.policy_types}
        for s in {s for rs in rules.values() for r in rs for s in r.sets}:
            self._ref(s)
        self._forget_policy(key)
        self.policies[key] = pol
        self._policies_by_ns[pol.namespace][key] = pol
        self._rules[key] = rules
        self.described.add(f"{pol.namespace}/{pol.name}")
        self._rechain_namespace(pol.namespace)

    def remove_policy(self, key: Key) -> None:
        if key in self.policies:
            self._forget_policy(key)
            self.described.add(f"{key[1]}/{key[2]}")
            self._rechain_namespace(key[1])

    def _forget_policy(self, key: Key) -> None:
        old = self.policies.pop(key, None)
        if old is None:
            return
        del self._policies_by_ns[old.namespace][key]
        for s in {s for rs in self._rules.pop(key).values() for r in rs for s in r.sets}:
            self._unref(s)

    def put_ports(self, bindings: Iterable[PortBinding]) -> None:
        """The node's pod veths with their addresses (anti-spoofing): every veth not among them goes."""
        want = {b.ifname: b for b in bindings}
        for ifname in sorted(self._ports.keys() - want.keys()):
            self.put_port(ifname, None)
        for binding in want.values():
            self.put_port(binding.ifname, binding)

    def put_port(self, ifname: str, binding: PortBinding | None) -> None:
        """One pod veth with its addresses (None: the veth is gone); the other veths' elements stay as they are."""
        old = self._ports.pop(ifname, None)
        if binding is not None:
            self._ports[ifname] = binding
        if old == binding:
            return
        before = bridge_elements([old] if old is not None else [])
        after = bridge_elements([binding] if binding is not None else [])
        for name in BRIDGE_SETS:
            where = f"bridge {name}"
            for element in before[name] - after[name]:
                self._put(where, element, None)
            for element in after[name]:
                self._put(where, element, element)

    # ---- the node's own pods ----

    def _candidate(self, key: Key, pod: Pod | None) -> None:
        old = self._candidates.pop(key, None)
        if old is None and pod is None:
            return
        affected = {key}
        for p in (old, pod):
            for _, ip in p.texts if p is not None else ():
                affected |= self._claims[ip]
        for _, ip in old.texts if old is not None else ():
            self._claims[ip].discard(key)
            if not self._claims[ip]:
                del self._claims[ip]
        if pod is not None:
            self._candidates[key] = pod
            for _, ip in pod.texts:
                self._claims[ip].add(key)
        self._enforce(sorted(affected))

    def _enforce(self, keys: list[Key]) -> None:
        """Which of these candidates are enforced now (they claim addresses they may share): all are withdrawn
        first, then the winners put back, so that an address passing from one to another keeps its elements."""
        for key in keys:
            old = self._enforced.pop(key, None)
            if old is not None:
                self._enforced_by_ns[old.namespace].discard(key)
                for v, ip in old.texts:
                    self._put(f"inet self{v}", f"{ip} . {ip}", None)
                    for d in DIRECTIONS:
                        self._put(f"inet {d}{v}", ip, None)
        for key in keys:
            pod = self._candidates.get(key)
            if pod is not None and all(min(self._claims[ip]) == key for _, ip in pod.texts):
                self._enforced[key] = pod
                self._enforced_by_ns[pod.namespace].add(key)
                for v, ip in pod.texts:
                    self._put(f"inet self{v}", f"{ip} . {ip}", f"{ip} . {ip}")
            self._rechain(key)

    def _rechain_namespace(self, namespace: str) -> None:
        for key in sorted(self._enforced_by_ns.get(namespace, ())):
            self._rechain(key)

    def _rechain(self, key: Key) -> None:
        """The pod's chains and map elements, from the policies selecting it now."""
        pod = self._enforced.get(key)
        pols = [] if pod is None else sorted(
            (p for p in self._policies_by_ns.get(pod.namespace, {}).values() if p.pod_selector.matches(pod.labels)),
            key=lambda p: (p.namespace, p.name))
        pids = frozenset(f"{p.namespace}/{p.name}" for p in pols)
        before = self._pod_policies.pop(key, frozenset())
        if pids:
            self._pod_policies[key] = pids
        if pids != before:
            who = f"{key[1]}/{key[2]}"
            for pid in before - pids:
                self.selected[pid].discard(who)
                if not self.selected[pid]:
                    del self.selected[pid]
            for pid in pids - before:
                self.selected[pid].add(who)
            self.described |= before ^ pids
        for d in DIRECTIONS:
            behind = [p for p in pols if d.capitalize() in p.policy_types]
            name = None
            if pod is not None and behind:
                name, lines = pod_chain(d, (r.for_pod(pod) for p in behind for r in self._rules[p.key][d]),
                                        (f"{p.namespace}/{p.name}" for p in behind), self.nflog_group)
                if name not in self.chains:
                    self.chains[name] = Chain(lines, frozenset(f"{p.namespace}/{p.name}" for p in behind))
                    self.chain_lines += len(lines)
                    self._made.add(name)
            was = self._pod_chain.pop((d, key), None)
            if name is not None:
                self._pod_chain[(d, key)] = name
            if was != name:
                if name is not None:
                    self.chains[name].users += 1
                if was is not None:
                    self.chains[was].users -= 1
                    if not self.chains[was].users:
                        self._unused_chains.add(was)
            for v, ip in pod.texts if pod is not None else ():
                self._put(f"inet {d}{v}", ip, f"{ip} : jump {name}" if name is not None else None)

    # ---- to the kernel ----

    def _collect(self, idle: bool) -> tuple[dict[str, frozenset[str]], list[str]]:
        """Drops the sets no policy refers to any more, and the chains no pod uses (idle) that refer to one of
        them, or with `idle` every idle chain; those the kernel holds (chains with their policies, and set
        names). Idle chains are otherwise kept: a pod behind the same policies may come (a pod's ADD makes
        no chain it can find), and the next full replace drops them."""
        dropped: list[str] = []
        for s in list(self._unused_sets):
            if not self._refs.get(s, 1):
                dropped += self._drop_set(s)
        self._unused_sets.clear()
        sets = [n for n in dropped if n not in self._made]
        self._made.difference_update(dropped)
        chains: dict[str, frozenset[str]] = {}
        for name in sorted(self._unused_chains):
            chain = self.chains.get(name)
            if chain is not None and chain.users:
                self._unused_chains.discard(name)
                continue
            if chain is None or not (idle or any(f"@{n}" in line for line in chain.lines for n in dropped)):
                continue
            self._unused_chains.discard(name)
            del self.chains[name]
            self.chain_lines -= len(chain.lines)
            if name in self._made:
                self._made.discard(name)
            else:
                chains[name] = chain.policies
        return chains, sorted(sets)

    def _settle(self) -> None:
        self._touched.clear()
        self._made.clear()

    def flush(self, idle: bool = False) -> Change:
        """The commands that bring tables holding the ruleset as last flushed (or rendered) to this one; with
        `idle`, they also delete the chains no pod uses."""
        gone_chains, gone_sets = self._collect(idle)
        made = [f"  set {n} {{ {self._declared[n]} }}\n" for n in sorted(self._made) if n in self._declared]
        made += [_chain_text(n, self.chains[n].lines) for n in sorted(self._made) if n in self.chains]
        out = [f"table inet {TABLE} {{\n{''.join(made)}}}\n"] if made else []
        drops: list[Elements] = []
        adds: list[Elements] = []
        for where, touched in sorted(self._touched.items()):
            els = self._elements[where]
            family, _, name = where.partition(" ")
            drop = [k for k, before in touched.items() if before is not None and els.get(k, (None,))[0] != before]
            add = [els[k][0] for k, before in touched.items() if k in els and els[k][0] != before]
            if drop:
                drops.append(Elements(family, TABLE, name, False, tuple(drop)))
            if add:
                adds.append(Elements(family, TABLE, name, True, tuple(add)))
        out += [f"{'add' if e.add else 'delete'} element {e.family} {e.table} {e.set} {{ {', '.join(e.items)} }}\n"
                for e in (*drops, *adds)]
        out += [f"delete chain inet {TABLE} {n}\n" for n in gone_chains]
        out += [f"delete set inet {TABLE} {n}\n" for n in gone_sets]
        alone = not (made or gone_chains or gone_sets)
        self._settle()
        return Change("".join(out), gone_chains, (*drops, *adds) if alone else None)

    def render(self) -> str:
        """Both tables in full, as one ruleset (elements sorted: the same state gives the same text), without
        idle chains."""
        self._collect(idle=True)
        self._settle()
        els = self._elements
        out = [f"table inet {TABLE} {{\n"]
        out += [f"  set {n} {{ {decl}{body(e for e, _ in els[f'inet {n}'].values())} }}\n"
                for n, decl in sorted(self._declared.items())]
        out += [f"  {decl}{body(e for e, _ in els[f'inet {n}'].values())} }}\n" for n, decl in POD_SETS.items()]
        out += [_chain_text(n, c.lines) for n, c in sorted(self.chains.items())]
        out.append(forward_chain() + "}\n")
        out.append(bridge_table({n: [e for e, _ in els[f"bridge {n}"].values()] for n in BRIDGE_SETS}))
        return "".join(out)

    # ---- figures ----

    @property
    def rules(self) -> int:
        return self.chain_lines + len(BASE_RULES) + len(BRIDGE_RULES)

    @property
    def sets(self) -> int:
        return len(self._declared)

    def chain_policies(self) -> dict[str, frozenset[str]]:
        return {name: c.policies for name, c in self.chains.items()}

    def isolated(self) -> int:
        return len(self._pod_policies)
