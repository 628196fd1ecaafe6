"""The drop counters survive every path that deletes or zeroes a pod chain's counter: a change that deletes
the chain, a policy update that replaces it, the resync's full replace after change-only applies, and the full
replace after a change the kernel refused. The kernel here is a fake that keeps named counters as nft would
(a replace zeroes every one); each test fails every time on a path that does not read the counters first
(as the resync did before 18f73b2)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from weftd.policy import metrics, model, tables
from weftd.policy.engine import PolicyEngine
from weftd.policy.layout import TABLE
from weftd.policy.ruleset import Change


class FakeKernel:
    """The policy tables' named counters, and every transaction sent."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[int, int]] = {}
        self.chains: set[str] = set()  # pod chains, each counting into its counter
        self.refuse = 0  # refuse this many change transactions
        self.replaces = 0
        self.changes = 0

    def replace(self, text: str) -> str | None:
        self.replaces += 1
        self.counters = {name: (0, 0) for name in re.findall(r"counter (\S+) \{ \}", text)}
        self.chains = set(re.findall(r"chain ([ie]_\w+) \{", text))
        return None

    def change(self, c: Change) -> str | None:
        commands = c.commands
        if self.refuse:
            self.refuse -= 1
            return "Error: refused"
        self.changes += 1
        for name in re.findall(rf"delete counter inet {TABLE} (\S+)", commands):
            del self.counters[name]
        for name in re.findall(r"counter (\S+) \{ \}", commands):
            self.counters.setdefault(name, (0, 0))  # nft's add: an existing counter keeps its values
        self.chains -= set(re.findall(rf"delete chain inet {TABLE} (\S+)", commands))
        self.chains |= set(re.findall(r"chain ([ie]_\w+) \{", commands))
        return None

    def read_counters(self, names: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
        wanted = None if names is None else set(names)
        return {n: c for n, c in self.counters.items() if wanted is None or n in wanted}

    def listing(self) -> str:
        return " ".join(sorted(self.chains))

    def drop(self, packets: int, engine: PolicyEngine) -> None:
        """`packets` dropped by every ingress pod chain a pod uses (of 100 bytes)."""
        used = {n for n, c in engine._ruleset.chains.items() if c.users} if engine._ruleset is not None else set()
        for name in self.chains & used:
            if name.startswith("i_"):
                p, b = self.counters[name]
                self.counters[name] = (p + packets, b + 100 * packets)


class Objects:
    """A policy source that says which keys changed."""

    def __init__(self, *raw: dict[str, Any]) -> None:
        self.items = {o.key: o for o in map(model.parse, raw)}
        self.changed = set(self.items)

    def put(self, raw: dict[str, Any]) -> None:
        obj = model.parse(raw)
        self.items[obj.key] = obj
        self.changed.add(obj.key)

    def poll(self) -> set[model.Key]:
        out, self.changed = self.changed, set()
        return out

    def objects(self) -> dict[model.Key, model.Object]:
        return self.items

    def wait(self, timeout: float) -> None:
        pass

    def error_count(self) -> int:
        return 0


def pod(name: str, ip: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "x", "labels": labels},
            "spec": {"nodeName": node}, "status": {"podIP": ip}}


def deny(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
            "metadata": {"name": "deny", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": rules}}


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    for name in ("replace", "change", "read_counters", "listing"):
        monkeypatch.setattr(tables, name, getattr(fake, name))
    monkeypatch.setattr(metrics, "read_counters", fake.read_counters)
    monkeypatch.setattr(tables, "enable_br_netfilter", lambda: None)
    return fake


def started(tmp_path: Path, source: Objects) -> tuple[PolicyEngine, CollectorRegistry]:
    (tmp_path / "ipam").mkdir()
    registry = CollectorRegistry()
    engine = PolicyEngine("me", source, tmp_path / "pods.json", tmp_path / "ipam", registry)
    engine.refresh()
    engine.request()
    return engine, registry


def dropped(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("weft_policy_dropped_packets_total", {"policy": "x/deny", "direction": "ingress"})


def test_drops_survive_every_path_that_deletes_or_zeroes_their_counter(tmp_path: Path, kernel: FakeKernel,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    source = Objects(deny([]), pod("db", "10.0.0.1", "me", {"app": "db"}), pod("web", "10.0.0.2", "other", {}))
    engine, registry = started(tmp_path, source)
    assert kernel.replaces == 1 and len(kernel.counters) == 2  # the db pod's ingress chain, and spoofed
    kernel.drop(5, engine)
    assert dropped(registry) == 5

    # a policy update: the pod's chain is replaced by another, in a change
    source.put(deny([{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]))
    engine.refresh()
    engine.request()
    assert kernel.changes == 1 and kernel.replaces == 1
    assert dropped(registry) == 5
    kernel.drop(2, engine)

    # the pod relabelled: no policy selects it any more, its chain is deleted
    source.put(pod("db", "10.0.0.1", "me", {"app": "cache"}))
    engine.refresh()
    engine.request()
    assert kernel.changes == 2
    assert dropped(registry) == 7

    # selected again, drops, then a remote pod's change applied alone: the resync replaces in full
    source.put(pod("db", "10.0.0.1", "me", {"app": "db"}))
    engine.refresh()
    engine.request()
    kernel.drop(3, engine)
    source.put(pod("web2", "10.0.0.3", "other", {"app": "web"}))
    engine.refresh()
    engine.request()
    assert dropped(registry) == 10
    assert engine._resync() and kernel.replaces == 2
    assert dropped(registry) == 10
    assert "behind weftd's back" not in caplog.text  # the idle chains went first: no drift to report

    # a change the kernel refuses: replaced in full instead
    kernel.drop(4, engine)
    kernel.refuse = 1
    source.put(pod("web3", "10.0.0.4", "other", {"app": "web"}))
    engine.refresh()
    engine.request()
    assert kernel.replaces == 3
    assert dropped(registry) == 14

    # a policy update that drops the set its old chain refers to: the chain is deleted, its counter retired
    kernel.drop(6, engine)
    chains = set(kernel.chains)
    source.put(deny([{"from": [{"podSelector": {"matchLabels": {"app": "cache"}}}]}]))
    engine.refresh()
    engine.request()
    assert kernel.replaces == 3 and chains - kernel.chains
    assert dropped(registry) == 20
    assert engine._resync() and kernel.replaces == 4
    assert dropped(registry) == 20


def test_the_first_apply_does_not_count_what_tables_it_did_not_apply_held(tmp_path: Path,
                                                                           kernel: FakeKernel) -> None:
    kernel.counters = {"i_000000000000": (9, 900)}  # a previous weftd's
    _, registry = started(tmp_path, Objects(deny([]), pod("db", "10.0.0.1", "me", {"app": "db"})))
    assert dropped(registry) == 0
