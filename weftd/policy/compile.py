"""One node's NetworkPolicy state compiled into its ruleset from scratch: what the engine replaces both tables
with at its start and resync, and what the incremental ruleset is checked against. The ruleset itself is
kept in ruleset.Ruleset; the tables' fixed parts are in layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weftd.policy.layout import SPOOFED, TABLE, PortBinding, transaction
from weftd.policy.model import NAME_LABEL, Namespace, NetworkPolicy, Object, Pod
from weftd.policy.ruleset import Ruleset

__all__ = ["SPOOFED", "TABLE", "Compiled", "PortBinding", "State", "build", "compile_ruleset", "transaction"]


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
    chain_policies: dict[str, frozenset[str]] = field(default_factory=dict)  # pod chain -> policies behind it


def build(state: State, local: Iterable[Pod], bindings: Iterable[PortBinding],
          nflog_group: int | None = None) -> Ruleset:
    """A ruleset holding `state`, with `local` the node's own pods: namespaces and policies first, so that
    each pod meets the peer sets that may hold it once."""
    ruleset = Ruleset(nflog_group)
    for ns in state.namespaces.values():
        ruleset.put_namespace(ns.name, ns.labels)
    for pol in state.policies:
        ruleset.put_policy(pol)
    mine = {p.key for p in local}
    for pod in state.pods:
        ruleset.put_pod(pod, pod.key in mine)
    ruleset.put_ports(bindings)
    return ruleset


def compile_ruleset(state: State, local: list[Pod], bindings: list[PortBinding],
                    nflog_group: int | None = None) -> Compiled:
    """The node's ruleset. With `nflog_group`, denied packets also go to that NFLOG group (at most 20 a second
    per pod chain), prefixed with the chain's name."""
    r = build(state, local, bindings, nflog_group)
    text = r.render()
    return Compiled(text, {pid: set(pods) for pid, pods in r.selected.items()}, len(r.chains), r.rules, r.sets,
                    r.chain_policies())
