"""weftd's NetworkPolicy engine: keeps the node's `weft_policy` tables equal to the compiled state.

Sources are read in full before the first apply, and every apply replaces both tables in one nftables
transaction, so a restarted weftd moves from the old ruleset to the new one with no moment in
between; when weftd stops, the tables stay. Pods this node attaches are bound to their Pod objects
when weftd's CNI server tells of them (`attached`, a PodHook), and their verdicts are in the kernel
before the ADD returns.

An ADD or DEL pays for what the pod changes, not for the cluster's size: each compile reuses what the
last one computed and the change leaves untouched (compile.Cache), reservations are read once
(bindings.Ports), and the kernel's tables are listed (to notice changes made behind weftd's back) only
by the periodic resync, which replaces them in full again when anything was applied since its last look.

The rooms beside it: `bindings` (which pod is which), `tables` (every nftables call), `metrics`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import netaddr
from prometheus_client import CollectorRegistry

from weftd.pod import Attachment, Refused
from weftd.policy import model, tables
from weftd.policy.bindings import Binding, Bindings, Ports
from weftd.policy.compile import Cache, Compiled, State, compile_ruleset, delta
from weftd.policy.metrics import DropCollector, Drops, PolicyMetrics
from weftlib.kernel import nft

log = logging.getLogger("weftd.policy")
STOP_CHECK = 0.5  # the longest the loop waits for a change before it looks at its stop event


class Source(Protocol):
    """Where the objects come from: a directory (source.DirSource) or the API server (kube.KubeSource).

    The engine calls poll() and objects() under one lock; wait() outside it."""

    def poll(self) -> set[model.Key]:
        """Takes in what changed since the last poll: the keys added, changed or removed (empty: nothing)."""
        ...

    def objects(self) -> Mapping[model.Key, model.Object]:
        """The current objects: a live view that only poll() changes; callers must not change it."""
        ...

    def wait(self, timeout: float) -> None:
        """Returns when a change may be there for poll(), or after `timeout` seconds."""
        ...

    def error_count(self) -> int: ...


class PolicyError(RuntimeError):
    pass


class PolicyEngine:
    def __init__(self, node: str, source: Source, state_file: Path, reservation_dir: Path,
                 registry: CollectorRegistry | None = None, resync: float = 10.0,
                 nflog_group: int | None = None) -> None:
        """`state_file`: where the bindings are kept; `reservation_dir`: weft-ipam's reservations of the
        node's network."""
        self.node = node
        self.source = source
        self.resync = resync
        self.nflog_group = nflog_group
        self._pods: list[model.Pod] = []  # the last apply's, to name the ends of denied packets
        self._names: tuple[list[model.Pod], dict[str, str]] = ([], {})  # for which _pods: address -> "ns/name"
        registry = registry or CollectorRegistry()
        self.metrics = PolicyMetrics(registry)
        self.drops = Drops()
        registry.register(DropCollector(self.drops, lambda: self.last.chain_policies if self.last else {}))
        self.subnets: tuple[netaddr.IPNetwork, ...] = ()  # the node's pod subnets, one per family
        self.bindings = Bindings(state_file)
        self.ports = Ports(reservation_dir)
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._lock = threading.Lock()  # the generation counter
        self._apply_lock = threading.Lock()
        self._source_lock = threading.Lock()  # the sources, and the reservations' stamp
        self._generation = 0
        self._applied_generation = -1
        self._applied_text: str | None = None
        self._described: dict[str, tuple[model.NetworkPolicy, list[str]]] = {}
        self._ports_stamp: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self.last: Compiled | None = None
        self._snapshot: str | None = None  # the tables as last applied, to notice changes behind weftd's back
        self._unchecked = False  # applied since the snapshot: the next resync applies in full and lists again
        self._cache = Cache()

    # ---- lifecycle ----

    def start(self, subnets: Iterable[netaddr.IPNetwork]) -> None:
        """Reads every source, applies the full ruleset once, then follows changes. `subnets`: the node's pod
        subnets (IPv4, IPv6 or both); a pod with an address in one of them is local."""
        self.subnets = tuple(subnets)
        tables.enable_br_netfilter()
        if self.nflog_group is not None:
            from weftd.policy.nflog import NflogReader

            try:
                NflogReader(self.nflog_group, self.explain).start()
                log.info("denied packets are logged from NFLOG group %d", self.nflog_group)
            except OSError as e:
                log.error("NFLOG group %d: %s; denied packets are dropped without a log line", self.nflog_group, e)
        self.refresh()
        try:
            self.request()
            owed = False
        except PolicyError:
            owed = True  # logged; the previous ruleset stays and the loop applies again
        self.ready.set()
        self._thread = threading.Thread(target=self._loop, args=(owed,), name="policy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self._thread is not None:
            self._thread.join(5)

    def refresh(self) -> bool:
        """Re-reads the sources; True if anything changed."""
        with self._source_lock:
            changed = bool(self.source.poll())
            self.metrics.invalid.set(self.source.error_count())  # a bad version changes no object, but counts
            stamp = self.ports.stamp()
            if stamp != self._ports_stamp:
                self._ports_stamp, changed = stamp, True
        return changed

    def _loop(self, owed: bool) -> None:
        """Applies after every change of the sources and, every `resync` seconds, checks the kernel's tables.
        `owed`: an apply failed, and none has succeeded since: the next round applies even without a change."""
        last_check = time.monotonic()
        while not self.stopped.is_set():
            self.source.wait(min(STOP_CHECK, max(0.0, last_check + self.resync - time.monotonic())))
            if self.stopped.is_set():
                break
            try:
                changed = self.refresh()
            except Exception as e:  # noqa: BLE001 - a source that cannot be read keeps what it last gave
                log.error("policy: %s", e)
                self.stopped.wait(STOP_CHECK)  # a source that fails at once would otherwise spin
                continue
            try:
                if time.monotonic() - last_check > self.resync:
                    last_check = time.monotonic()
                    if self._resync():  # applied in full: it covers every change and what was owed
                        changed = owed = False
                if changed or owed:
                    self.request()
                    owed = False
            except Exception as e:  # noqa: BLE001 - keep enforcing the last good ruleset; apply again next round
                owed = True
                log.error("policy: %s", e)

    # ---- the CNI server's hook (before the reply) ----

    def attached(self, pod: Attachment) -> None:
        """Binds the pod to its addresses and applies; raises Refused if its verdicts cannot be put in."""
        if not pod.namespace or not pod.name:
            return  # not a Kubernetes pod: no Pod object can select it
        try:
            if not self.ready.wait(60):
                raise PolicyError("the policy engine is not ready yet")
            ips = tuple(netaddr.IPAddress(int(a.ip), a.version) for a in pod.addresses)
            before = self.bindings.put(pod.container_id, Binding(pod.namespace, pod.name, ips))
            try:
                self.refresh()  # the pod's verdicts follow the sources as they are now, not as last polled
                self.request()
            except Exception:
                self.bindings.put(pod.container_id, before)  # the ADD is rolled back: forget the pod again
                raise
        except Exception as e:  # noqa: BLE001 - whatever it was, the pod would run without its verdicts
            raise Refused(f"NetworkPolicy could not be applied for this pod: {e}") from None
        log.info("pod %s/%s (%s) bound to %s on %s", pod.namespace, pod.name, pod.container_id[:12],
                 ", ".join(map(str, ips)), pod.host_veth)

    def detached(self, container_id: str) -> None:
        gone = self.bindings.put(container_id, None)
        if gone is not None:
            self.refresh()  # takes in the released reservation too, so the loop does not start an apply of its own
            self.request()
            log.info("pod %s/%s (%s) unbound", gone.namespace, gone.name, container_id[:12])

    # ---- state ----

    def state(self) -> tuple[State, list[model.Pod]]:
        with self._source_lock:
            objects = list(self.source.objects().values())  # poll() from another thread changes the live view
        state = State.of(objects)
        pods = {p.key: p for p in state.pods}
        bindings = self.bindings.all()
        bound: dict[model.Key, model.Pod] = {}
        for b in bindings:
            key = ("Pod", b.namespace, b.name)
            known = pods.get(key)
            # A pod ADDed before its object is known: its namespace's policies already apply to it.
            pod = model.Pod(b.namespace, b.name) if known is None else known
            bound[key] = replace(pod, ips=b.ips, host_network=False, node_name=self.node)
        taken = {ip for p in bound.values() for ip in p.ips}
        for key, pod in pods.items():
            if key not in bound and any(ip in taken for ip in pod.ips):
                # A stale object still lists an address this node has given to another pod.
                pods[key] = replace(pod, ips=tuple(ip for ip in pod.ips if ip not in taken))
        pods.update(bound)
        state.pods = sorted(pods.values(), key=lambda p: p.key)
        local = [p for p in state.pods if p.is_peer and (p.key in bound or p.node_name == self.node
                                                          or any(ip in s for ip in p.ips for s in self.subnets))]
        return state, local

    # ---- apply ----

    def request(self) -> None:
        """Applies the current state; returns once a ruleset covering every change made so far is in."""
        with self._lock:
            self._generation += 1
            wanted = self._generation
        with self._apply_lock:
            if self._applied_generation >= wanted:
                return  # another thread's apply already covered this change
            with self._lock:
                generation = self._generation
            self._apply()
            self._applied_generation = generation

    def _apply(self) -> None:
        t = time.perf_counter()
        try:
            state, local = self.state()
            full = self._applied_text is None
            compiled = compile_ruleset(state, local, self.ports.bindings(), self.nflog_group, self._cache)
            self._pods = state.pods
            if compiled.text != self._applied_text:
                before = self._send(compiled, full)
                self.drops.keep(before, self.last.chain_policies if self.last is not None else {})
                self._applied_text = compiled.text
                if full:  # at the start and at a resync: what the kernel holds now is what the next one expects
                    self._snapshot, self._unchecked = tables.listing(), False
                else:
                    self._unchecked = True
                self.last = compiled
            self._describe(state, compiled)
        except (PolicyError, nft.Unavailable) as e:
            self.metrics.errors.inc()
            log.error("applying NetworkPolicy: %s; the previous ruleset stays in force", e)
            raise PolicyError(str(e)) from None
        took = time.perf_counter() - t
        m = self.metrics
        m.apply.observe(took)
        m.last_apply.set_to_current_time()
        m.rules.set(compiled.rules)
        m.chains.set(compiled.chains)
        m.policies.set(len(state.policies))
        m.isolated.set(len(set().union(*compiled.selected.values())) if compiled.selected else 0)
        m.selected.clear()
        for pid, pods in compiled.selected.items():
            m.selected.labels(pid).set(len(pods))
        log.debug("policy ruleset: %d policies, %d local pods, %d rules, %.3fs", len(state.policies), len(local),
                  compiled.rules, took)

    def _send(self, compiled: Compiled, full: bool) -> dict[str, tuple[int, int]]:
        """Puts `compiled` in the kernel in one transaction: only what changed since the last apply, or (at
        the start, at a resync, or if that fails) both tables replaced in full. Returns the counters the
        transaction deleted or reset, as they were just before."""
        change = None if full or self.last is None else delta(self.last, compiled)
        if change is not None:
            before = tables.read_counters(change.removed | change.reset)
            refused = tables.change(change.commands)
            if refused is None:
                return before
            log.warning("policy: applying the change alone failed (%s); replacing the tables in full", refused)
        # what the drop counters held goes into the totals before the replace zeroes them (also at a resync,
        # which forgets _applied_text); only tables weftd did not apply yet are not read
        before = tables.read_counters() if self.last is not None else {}
        refused = tables.replace(compiled.text)
        if refused is not None:
            raise PolicyError(f"nft: {refused}")
        return before

    def _resync(self) -> bool:
        """The periodic full check. If anything was applied since the last look at the kernel, or the tables
        differ from that look, both tables are replaced in full (the reservations read anew) and listed again.
        True if it applied."""
        with self._apply_lock:
            if self._snapshot is None:
                return False  # nothing applied yet: the loop applies in full, as it owes an apply
            seen = tables.listing()
            unchecked = self._unchecked
            if not unchecked and seen == self._snapshot:
                return False
            applied = self._applied_text
            self._applied_text = None
            self.ports.forget()
            with self._lock:
                generation = self._generation
            self._apply()
            self._applied_generation = generation
            # After applies the listing was not compared with, the same ruleset applied anew tells.
            if not unchecked or (self._applied_text == applied and seen != self._snapshot):
                log.warning("policy tables missing or changed behind weftd's back; applying them again")
            return True

    def explain(self, chain: str, src: str, dst: str) -> str:
        """Who a denied packet came from and went to, and which policies did not allow it."""
        pods = self._pods  # built here, not at every apply: an ADD should not pay for the cluster's size
        if self._names[0] is not pods:
            self._names = (pods, {str(ip): f"{p.namespace}/{p.name}" for p in pods if p.is_peer for ip in p.ips})
        names = self._names[1]

        def name(addr: str) -> str:
            host = addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr
            return names.get(host, "outside the pods known")

        compiled = self.last
        policies = sorted(compiled.chain_policies.get(chain, ())) if compiled is not None else []
        direction, pod = ("ingress", name(dst)) if chain.startswith("i_") else ("egress", name(src))
        return (f"{name(src)} -> {name(dst)}; {direction} of {pod} allowed by none of "
                f"{', '.join(policies) or 'its policies'}")

    def _describe(self, state: State, compiled: Compiled) -> None:
        """A log line per policy whose definition or selection changed, and per policy removed."""
        now: dict[str, tuple[model.NetworkPolicy, list[str]]] = {}
        for pol in state.policies:
            pid = f"{pol.namespace}/{pol.name}"
            pods = sorted(compiled.selected.get(pid, ()))
            now[pid] = (pol, pods)
            if self._described.get(pid) != now[pid]:
                log.info("policy %s applied: %s, %d ingress and %d egress rules, selects %d local pods%s", pid,
                         "+".join(sorted(pol.policy_types)), len(pol.ingress), len(pol.egress), len(pods),
                         f" ({', '.join(pods)})" if pods else "")
        for pid in set(self._described) - set(now):
            log.info("policy %s removed", pid)
        self._described = now
