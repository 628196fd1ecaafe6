"""What the policy engine tells Prometheus: its applies, and the packets its pod chains dropped, per policy.

A packet dropped at a pod chain's end was allowed by none of the policies selecting that pod, so it counts
for each of them. Counters live in the kernel and restart when a chain is replaced or deleted; what they held
is added to the kept totals just before, so the exported counters only grow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from weftd.policy.layout import SPOOFED
from weftd.policy.tables import read_counters

Totals = dict[tuple[str, str], tuple[int, int]]  # (policy, direction) -> (packets, bytes)
Chains = Mapping[str, Any]  # pod chain -> the policies behind it (Compiled.chain_policies)


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.apply = Histogram("weft_policy_apply_seconds", "Time to compile and apply the policy ruleset",
                               registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.last_apply = Gauge("weft_policy_last_apply_timestamp_seconds", "When the ruleset was last applied",
                                registry=r)
        self.errors = Counter("weft_policy_apply_errors_total", "Failed applies of the policy ruleset", registry=r)
        self.rules = Gauge("weft_policy_rules", "Rules in the policy tables", registry=r)
        self.chains = Gauge("weft_policy_chains", "Pod chains in the policy table", registry=r)
        self.selected = Gauge("weft_policy_selected_pods", "Local pods a policy selects", ["policy"], registry=r)
        self.isolated = Gauge("weft_policy_isolated_pods", "Local pods selected by at least one policy", registry=r)
        self.invalid = Gauge("weft_policy_invalid_objects", "Problems found in the policy sources", registry=r)
        self.policies = Gauge("weft_policies", "NetworkPolicies known", registry=r)


def _add(base: Totals, counters: Mapping[str, tuple[int, int]], chains: Chains) -> Totals:
    """`base` plus the kernel's counters, attributed through the pod chains of the ruleset they counted in."""
    out = dict(base)
    for name, (packets, octets) in counters.items():
        owners = [(SPOOFED, "")] if name == SPOOFED else \
            [(pid, "ingress" if name.startswith("i_") else "egress") for pid in chains.get(name, ())]
        for key in owners:
            p0, b0 = out.get(key, (0, 0))
            out[key] = (p0 + packets, b0 + octets)
    return out


class Drops:
    """The drop totals of the counters that are gone: kept when a transaction deletes or resets them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: Totals = {}

    def keep(self, counters: Mapping[str, tuple[int, int]], chains: Chains) -> None:
        """Counters as they were just before a transaction deleted or reset them, in the ruleset of `chains`."""
        with self._lock:
            self._kept = _add(self._kept, counters, chains)

    def totals(self, counters: Mapping[str, tuple[int, int]], chains: Chains) -> Totals:
        """The kept totals and the kernel's counters now, in the ruleset of `chains` (the one in force)."""
        with self._lock:
            return _add(self._kept, counters, chains)


class DropCollector:
    """weft_policy_dropped_{packets,bytes}_total per policy and direction, and weft_policy_spoofed_packets_total,
    read from the kernel at each scrape. `chains`: the pod chains of the ruleset in force."""

    def __init__(self, drops: Drops, chains: Callable[[], Chains]) -> None:
        self.drops = drops
        self.chains = chains

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals = self.drops.totals(read_counters(), self.chains())
        pk = CounterMetricFamily("weft_policy_dropped_packets", "Packets dropped because no policy allowed them",
                                 labels=["policy", "direction"])
        by = CounterMetricFamily("weft_policy_dropped_bytes", "Bytes dropped because no policy allowed them",
                                 labels=["policy", "direction"])
        for (pid, direction), (packets, octets) in sorted(totals.items()):
            if pid == SPOOFED:
                continue
            pk.add_metric([pid, direction], packets)
            by.add_metric([pid, direction], octets)
        spoofed = CounterMetricFamily("weft_policy_spoofed_packets", "Packets dropped for a source address "
                                      "that is not the sending pod's")
        spoofed.add_metric([], totals.get((SPOOFED, ""), (0, 0))[0])
        yield from (pk, by, spoofed)
