"""weftd's NetworkPolicy engine: keeps the node's `weft_policy` tables equal to the compiled state.

Sources are read in full before the first apply, which replaces both tables in one nftables transaction, so
a restarted weftd moves from the old ruleset to the new one with no moment in between; when weftd stops, the
tables stay. Pods this node attaches are bound to their Pod objects when weftd's CNI server tells of them
(`attached`, a PodHook), and their verdicts are in the kernel before the ADD returns.

After that, every change costs what it touches, not the cluster's size: the objects that changed (from the
source, or a pod bound or unbound here) go into the ruleset one by one (ruleset.Ruleset), which turns them
into one transaction of element changes (and of the chains and sets that appear or go). The periodic resync
lists the kernel's tables to notice changes made behind weftd's back, and replaces them in full when anything
was applied change by change since its last look; so does a change the kernel refuses.

The rooms beside it: `bindings` (which pod is which), `tables` (every nftables call), `metrics`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import netaddr
from prometheus_client import CollectorRegistry

from weftd.pod import Attachment, Refused
from weftd.policy import model, tables
from weftd.policy.bindings import Binding, Bindings, Ports
from weftd.policy.compile import Compiled
from weftd.policy.layout import PortBinding
from weftd.policy.metrics import DropCollector, Drops, PolicyMetrics
from weftd.policy.ruleset import Change, Ruleset
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
        registry = registry or CollectorRegistry()
        self.metrics = PolicyMetrics(registry)
        self.drops = Drops()
        # The pod chains' counters in the kernel, and the policies they count for: those of the chains in force,
        # and those left by chains a change deleted (retired), until a full replace reads and removes them.
        self._chain_policies: dict[str, frozenset[str]] = {}
        self._retired: dict[str, frozenset[str]] = {}
        registry.register(DropCollector(self.drops, lambda: self._chain_policies))
        self.subnets: tuple[netaddr.IPNetwork, ...] = ()  # the node's pod subnets, one per family
        self.bindings = Bindings(state_file)
        self.ports = Ports(reservation_dir)
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._lock = threading.Lock()  # the generation counter
        self._apply_lock = threading.Lock()
        self._source_lock = threading.Lock()  # the sources, what was taken from them, and the reservations' stamp
        self._generation = 0
        self._applied_generation = -1
        # What was taken from the sources and the bindings, kept up to date key by key:
        self._objects: dict[model.Key, model.Object] = {}
        self._by_addr: dict[netaddr.IPAddress, set[model.Key]] = defaultdict(set)  # Pod objects by address
        self._bound: dict[model.Key, Binding] = {}
        self._taken: dict[netaddr.IPAddress, model.Key] = {}  # the bound pods' addresses
        self._pending: set[model.Key] = set()  # changed since the last apply
        self._ports_stamp: tuple[int, int] | None = None
        self._ports_changed = True
        self._port_changes: dict[str, PortBinding | None] = {}  # veths the hook changed since the last apply
        self._veths: dict[str, str] = {}  # container ID -> its veth, for the pods the hook attached in this run
        self._ruleset: Ruleset | None = None  # what the kernel holds; None: the next apply replaces in full
        self._described: dict[str, tuple[model.NetworkPolicy, list[str]]] = {}
        self._thread: threading.Thread | None = None
        self.last: Compiled | None = None  # the last ruleset applied in full
        self._snapshot: str | None = None  # the tables as last applied, to notice changes behind weftd's back
        self._unchecked = False  # applied since the snapshot: the next resync applies in full and lists again

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
        """Takes in what changed in the sources, the bindings and the reservations; True if anything did."""
        with self._source_lock:
            self._take(self.source.poll())
            self.metrics.invalid.set(self.source.error_count())  # a bad version changes no object, but counts
            self._rebind()
            changed = bool(self._pending)
            stamp = self.ports.stamp()
            if stamp != self._ports_stamp:
                self._ports_stamp = stamp
                self._ports_changed = changed = True
        return changed

    def _take(self, polled: set[model.Key]) -> None:
        """The objects that changed, into _objects and _pending."""
        objects = self.source.objects()
        for key in polled:
            old, new = self._objects.get(key), objects.get(key)
            if old == new:
                continue
            for ip in old.ips if isinstance(old, model.Pod) else ():
                self._by_addr[ip].discard(key)
                if not self._by_addr[ip]:
                    del self._by_addr[ip]
            for ip in new.ips if isinstance(new, model.Pod) else ():
                self._by_addr[ip].add(key)
            if new is None:
                del self._objects[key]
            else:
                self._objects[key] = new
            self._pending.add(key)

    def _rebind(self) -> None:
        """The bindings as they are now; the pods whose binding changed, and the objects at their addresses
        (which lose or get back the addresses a bound pod holds), into _pending."""
        bound = {("Pod", b.namespace, b.name): b for b in self.bindings.all()}
        changed = {k for k in bound.keys() | self._bound.keys() if bound.get(k) != self._bound.get(k)}
        if not changed:
            return
        for key in changed:
            for b in (bound.get(key), self._bound.get(key)):
                for ip in b.ips if b is not None else ():
                    self._pending |= self._by_addr.get(ip, set())
        self._pending |= changed
        self._bound = bound
        self._taken = {ip: k for k, b in bound.items() for ip in b.ips}

    def _effective(self, key: model.Key) -> tuple[model.Pod | None, bool]:
        """The pod as policy sees it, and whether it is one of this node's: a bound pod has its binding's
        addresses (with no object yet, no labels: its namespace's policies that select every pod apply from
        its first packet); another pod's object loses the addresses this node gave to a bound pod (a stale
        object)."""
        obj = self._objects.get(key)
        pod = obj if isinstance(obj, model.Pod) else None
        binding = self._bound.get(key)
        if binding is not None:
            base = pod if pod is not None else model.Pod(key[1], key[2])
            return replace(base, ips=binding.ips, host_network=False, node_name=self.node), True
        if pod is None:
            return None, False
        if any(ip in self._taken for ip in pod.ips):
            pod = replace(pod, ips=tuple(ip for ip in pod.ips if ip not in self._taken))
        local = pod.is_peer and (pod.node_name == self.node or any(ip in s for ip in pod.ips for s in self.subnets))
        return pod, local

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
                self._take_port(pod.container_id, Ports.port(pod.container_id, pod.ifname, ips))
                self.refresh()  # the pod's verdicts follow the sources as they are now, not as last polled
                self.request()
            except Exception:
                self.bindings.put(pod.container_id, before)  # the ADD is rolled back: forget the pod again
                self._take_port(pod.container_id, None)
                raise
        except Exception as e:  # noqa: BLE001 - whatever it was, the pod would run without its verdicts
            raise Refused(f"NetworkPolicy could not be applied for this pod: {e}") from None
        log.info("pod %s/%s (%s) bound to %s on %s", pod.namespace, pod.name, pod.container_id[:12],
                 ", ".join(map(str, ips)), pod.host_veth)

    def detached(self, container_id: str) -> None:
        gone = self.bindings.put(container_id, None)
        if gone is not None:
            self._take_port(container_id, None)
            self.refresh()  # takes in the released reservation too, so the loop does not start an apply of its own
            self.request()
            log.info("pod %s/%s (%s) unbound", gone.namespace, gone.name, container_id[:12])

    def _take_port(self, container_id: str, port: PortBinding | None) -> None:
        """The veth of a pod the hook attached (None: detached): only its own elements change, and the
        reservations as they are now count as taken in, so that the ADD or DEL reads none of them. A pod
        attached before this run has no veth known here: its reservations are read again, all of them. A
        reservation made or released by anything else meanwhile is taken in by the next resync, which reads
        every reservation (it replaces in full, as this change is applied change by change)."""
        with self._source_lock:
            if port is None:
                veth = self._veths.pop(container_id, None)
                if veth is None:
                    return
                self._port_changes[veth] = None
            else:
                self._veths[container_id] = port.ifname
                self._port_changes[port.ifname] = port
            if not self._ports_changed:
                self._ports_stamp = self.ports.stamp()

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

    def _build(self) -> Ruleset:
        """A ruleset from scratch, from everything taken in."""
        with self._source_lock:
            self._pending.clear()
            self._port_changes.clear()  # the reservations, read below, cover them
            objects = list(self._objects.values())
            pods = [self._effective(k) for k in {o.key for o in objects if isinstance(o, model.Pod)} | set(self._bound)]
        ruleset = Ruleset(self.nflog_group)
        for obj in objects:
            if isinstance(obj, model.Namespace):
                ruleset.put_namespace(obj.name, obj.labels)
            elif isinstance(obj, model.NetworkPolicy):
                ruleset.put_policy(obj)
        for pod, local in sorted(((p, lo) for p, lo in pods if p is not None), key=lambda x: x[0].key):
            ruleset.put_pod(pod, local)
        self._ports_changed = False
        ruleset.put_ports(self.ports.bindings())
        return ruleset

    def _update(self, ruleset: Ruleset) -> None:
        """The changes taken in since the last apply, into the ruleset."""
        with self._source_lock:
            keys, self._pending = self._pending, set()
            changes = [(k, self._objects.get(k), self._effective(k) if k[0] == "Pod" else (None, False))
                       for k in sorted(keys)]
            ports, self._ports_changed = self._ports_changed, False
            port_changes, self._port_changes = self._port_changes, {}
        for key, obj, (pod, local) in changes:
            if isinstance(obj, model.Namespace) or key[0] == "Namespace":
                ruleset.put_namespace(key[2], obj.labels if isinstance(obj, model.Namespace) else None)
            elif isinstance(obj, model.NetworkPolicy):
                ruleset.put_policy(obj)
            elif key[0] == "NetworkPolicy":
                ruleset.remove_policy(key)
            elif pod is not None:
                ruleset.put_pod(pod, local)
            else:
                ruleset.remove_pod(key)
        for ifname, port in sorted(port_changes.items()):
            ruleset.put_port(ifname, port)
        if ports:
            ruleset.put_ports(self.ports.bindings())

    def _apply(self) -> None:
        t = time.perf_counter()
        ruleset = self._ruleset
        try:
            if ruleset is None:
                ruleset = self._build()
                self._replace(ruleset)
            else:
                self._update(ruleset)
                change = ruleset.flush()
                if change.commands:
                    self._change(ruleset, change)
            self._describe(ruleset, ruleset is not self._ruleset)
            self._ruleset = ruleset
            self._chain_policies = {**self._retired, **ruleset.chain_policies()}
        except (PolicyError, nft.Unavailable) as e:
            self._ruleset = None  # the kernel may not hold what the ruleset says: next time, in full
            self.metrics.errors.inc()
            log.error("applying NetworkPolicy: %s; the previous ruleset stays in force", e)
            raise PolicyError(str(e)) from None
        took = time.perf_counter() - t
        m = self.metrics
        m.apply.observe(took)
        m.last_apply.set_to_current_time()
        m.rules.set(ruleset.rules)
        m.chains.set(len(ruleset.chains))
        m.policies.set(len(ruleset.policies))
        m.isolated.set(ruleset.isolated())
        log.debug("policy ruleset: %d policies, %d rules, %.3fs", len(ruleset.policies), ruleset.rules, took)

    def _change(self, ruleset: Ruleset, change: Change) -> None:
        """Sends a change alone, in one transaction; if the kernel refuses it, replaces both tables in full."""
        refused = tables.change(change)
        if refused is None:
            self._retired.update(change.removed)  # their counters stay until the next full replace
            self._unchecked = True
            return
        log.warning("policy: applying the change alone failed (%s); replacing the tables in full", refused)
        self._replace(ruleset)

    def _replace(self, ruleset: Ruleset) -> None:
        """Replaces both tables with the ruleset, in one transaction."""
        # What the drop counters held goes into the totals before the replace zeroes them (also at a resync and
        # after a refused change); only tables this weftd did not apply yet are not read.
        before = tables.read_counters() if self.last is not None else {}
        text = ruleset.render()
        refused = tables.replace(text)
        if refused is not None:
            raise PolicyError(f"nft: {refused}")
        self.drops.keep(before, self._chain_policies)
        self._retired.clear()
        self.last = Compiled(text, {pid: set(pods) for pid, pods in ruleset.selected.items()}, len(ruleset.chains),
                             ruleset.rules, ruleset.sets, ruleset.chain_policies())
        self._snapshot, self._unchecked = tables.listing(), False

    def _resync(self) -> bool:
        """The periodic full check. If anything was applied since the last look at the kernel, or the tables
        differ from that look, both tables are replaced in full (the reservations read anew) and listed again.
        True if it applied."""
        with self._apply_lock:
            if self._snapshot is None:
                return False  # nothing applied yet: the loop applies in full, as it owes an apply
            seen = tables.listing()
            if not self._unchecked and seen == self._snapshot:
                return False
            if self._unchecked and self._ruleset is not None:
                # What changed since the last apply, and the idle chains (a full replace has none) deleted, so
                # that the listing and the replace agree unless something else changed the tables.
                self._apply()
                idle = self._ruleset.flush(idle=True)
                if idle.commands:
                    self._change(self._ruleset, idle)
                seen = tables.listing()
            self._ruleset = None
            self.ports.forget()
            with self._lock:
                generation = self._generation
            self._apply()
            self._applied_generation = generation
            if seen != self._snapshot:
                log.warning("policy tables missing or changed behind weftd's back; applying them again")
            return True

    def explain(self, chain: str, src: str, dst: str) -> str:
        """Who a denied packet came from and went to, and which policies did not allow it."""

        def name(addr: str) -> str:
            host = addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr
            try:
                ip = netaddr.IPAddress(host)
            except (ValueError, netaddr.AddrFormatError):
                return "outside the pods known"
            with self._source_lock:  # the loop's thread changes them
                key = self._taken.get(ip) or min(self._by_addr.get(ip, ()), default=None)
            return f"{key[1]}/{key[2]}" if key is not None else "outside the pods known"

        policies = sorted(self._chain_policies.get(chain, ()))
        direction, pod = ("ingress", name(dst)) if chain.startswith("i_") else ("egress", name(src))
        return (f"{name(src)} -> {name(dst)}; {direction} of {pod} allowed by none of "
                f"{', '.join(policies) or 'its policies'}")

    def _describe(self, ruleset: Ruleset, fresh: bool) -> None:
        """A log line per policy whose definition or selection changed, and per policy removed; their gauges."""
        pids = set(ruleset.described)
        ruleset.described.clear()
        if fresh:
            pids |= set(self._described)  # policies gone with the ruleset before
        for pid in sorted(pids):
            ns, _, pname = pid.partition("/")
            pol = ruleset.policies.get(("NetworkPolicy", ns, pname))
            if pol is None:
                if self._described.pop(pid, None) is not None:
                    log.info("policy %s removed", pid)
                    self.metrics.selected.remove(pid)
                continue
            pods = sorted(ruleset.selected.get(pid, ()))
            self.metrics.selected.labels(pid).set(len(pods))
            if self._described.get(pid) != (pol, pods):
                self._described[pid] = (pol, pods)
                log.info("policy %s applied: %s, %d ingress and %d egress rules, selects %d local pods%s", pid,
                         "+".join(sorted(pol.policy_types)), len(pol.ingress), len(pol.egress), len(pods),
                         f" ({', '.join(pods)})" if pods else "")
