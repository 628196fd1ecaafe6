"""weftd's NetworkPolicy engine: keeps the node's `weft_policy` tables equal to the compiled state.

Sources are read in full before the first apply, and every apply replaces both tables in one nftables
transaction, so a restarted weftd moves from the old ruleset to the new one with no moment in
between; when weftd stops, the tables stay. Pods this node attaches are bound to their Pod objects
through the CNI ADD (K8S_POD_NAMESPACE, K8S_POD_NAME) and their verdicts are in the kernel before
the ADD returns. Bindings are kept in a file, so a restarted weftd still knows its pods.

An ADD or DEL pays for what the pod changes, not for the cluster's size: each compile reuses what the
last one computed and the change leaves untouched (compile.Cache), lease files are read once, and the
kernel's tables are listed (to notice changes made behind weftd's back) only by the periodic resync,
which replaces them in full again when anything was applied since its last look.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import netaddr
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from cni_plugin.attachment import host_veth_name
from weftd.policy import model
from weftd.policy.compile import (
    SPOOFED,
    TABLE,
    Cache,
    Compiled,
    PortBinding,
    State,
    compile_ruleset,
    delta,
    transaction,
)
from weftlib.cni.skel import parse_cni_args
from weftlib.kernel import nft, sysctl
from weftlib.kernel.files import write_atomic

log = logging.getLogger("weftd.policy")
POLL = 0.5
BRIDGE_SYSCTLS = ("/proc/sys/net/bridge/bridge-nf-call-iptables", "/proc/sys/net/bridge/bridge-nf-call-ip6tables")


class Source(Protocol):
    """Where the objects come from: a directory (source.DirSource) or the API server (kube.KubeSource)."""

    def poll(self) -> bool: ...

    def objects(self) -> dict[model.Key, model.Object]: ...

    def error_count(self) -> int: ...


class PolicyError(RuntimeError):
    pass


@dataclass(frozen=True)
class Binding:
    """A pod this node attached: the CNI ADD tells its name and addresses."""

    namespace: str
    name: str
    ips: tuple[netaddr.IPAddress, ...]

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "ips": [str(ip) for ip in self.ips]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Binding:
        return cls(str(d["namespace"]), str(d["name"]), tuple(netaddr.IPAddress(ip) for ip in d["ips"]))


def enable_br_netfilter() -> None:
    """Bridged pod-to-pod frames reach the inet forward hook only with br_netfilter on (in this netns)."""
    for path in BRIDGE_SYSCTLS:
        try:
            if sysctl.write(path, "1", missing_ok=False):
                log.info("enabled %s for NetworkPolicy on same-node traffic", path.rsplit("/", 1)[1])
        except FileNotFoundError:
            log.error("br_netfilter is not loaded (%s missing): policy between pods on the same node is NOT "
                      "enforced; load it with `modprobe br_netfilter`", path)
            return
    log.info("br_netfilter: bridge-nf-call-iptables and bridge-nf-call-ip6tables are on")


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


def read_counters(names: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """Packets and bytes of every named counter in the policy tables (one per pod chain, and `spoofed`), or
    of the pod chains `names` (none: no call; one listing costs about as much as one counter)."""
    out: dict[str, tuple[int, int]] = {}
    wanted = None if names is None else set(names)
    for family in ("inet", "bridge") if wanted is None else ("inet",) if wanted else ():
        status, text, _ = nft.run(f"list counters table {family} {TABLE}", json_output=True)
        if status != 0:
            continue
        for item in json.loads(text).get("nftables", []):
            c = item.get("counter")
            if c is not None and (wanted is None or c["name"] in wanted):
                out[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
    return out


class DropCollector:
    """weft_policy_dropped_{packets,bytes}_total per policy and direction, from the pod chains' counters.

    A packet dropped at a pod chain's end was allowed by none of the policies selecting that pod, so it
    counts for each of them. Counters live in the kernel and restart when a chain is replaced; what they
    held is added to the totals just before, so the exported counters only grow."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        totals = self.engine.drop_totals(read_counters())
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
        return [pk, by, spoofed]


class PolicyEngine:
    def __init__(self, node: str, source: Source, state_file: Path, lease_dir: Path,
                 registry: CollectorRegistry | None = None, resync: float = 10.0,
                 nflog_group: int | None = None) -> None:
        self.node = node
        self.source = source
        self.state_file = state_file
        self.lease_dir = lease_dir
        self.resync = resync
        self.nflog_group = nflog_group
        self._pods: list[model.Pod] = []  # the last apply's, to name the ends of denied packets
        self._names: tuple[list[model.Pod], dict[str, str]] = ([], {})  # for which _pods: address -> "ns/name"
        registry = registry or CollectorRegistry()
        self.metrics = PolicyMetrics(registry)
        registry.register(DropCollector(self))
        self._dropped: dict[tuple[str, str], tuple[int, int]] = {}
        self.subnets: tuple[netaddr.IPNetwork, ...] = ()  # the node's pod subnets, one per family
        self.bindings: dict[str, Binding] = self._load_bindings()
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._lock = threading.Lock()  # bindings, generation
        self._apply_lock = threading.Lock()
        self._source_lock = threading.Lock()
        self._generation = 0
        self._applied_generation = -1
        self._applied_text: str | None = None
        self._described: dict[str, tuple[model.NetworkPolicy, list[str]]] = {}
        self._lease_stamp: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self.last: Compiled | None = None
        self._retry = False
        self._snapshot: str | None = None  # the tables as last applied, to notice changes behind weftd's back
        self._unchecked = False  # applied since the snapshot: the next resync applies in full and lists again
        self._cache = Cache()
        self._leases: dict[str, tuple[tuple[int, int, int], netaddr.IPAddress, str]] = {}  # file -> stat, address, veth

    # ---- lifecycle ----

    def start(self, subnets: Iterable[netaddr.IPNetwork]) -> None:
        """Reads every source, applies the full ruleset once, then follows changes. `subnets`: the node's pod
        subnets (IPv4, IPv6 or both); a pod with an address in one of them is local."""
        self.subnets = tuple(subnets)
        enable_br_netfilter()
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
        except PolicyError:
            self._retry = True  # logged; the previous ruleset stays and the loop tries again
        self.ready.set()
        self._thread = threading.Thread(target=self._loop, name="policy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self._thread is not None:
            self._thread.join(5)

    def refresh(self) -> bool:
        """Re-reads the sources; True if anything changed."""
        with self._source_lock:
            changed = self.source.poll()
            stamp = self._leases_stamp()
            if stamp != self._lease_stamp:
                self._lease_stamp, changed = stamp, True
        return changed

    def _loop(self) -> None:
        last_check = time.monotonic()
        while not self.stopped.wait(POLL):
            try:
                changed = self.refresh()
                if time.monotonic() - last_check > self.resync:
                    last_check = time.monotonic()
                    retry, self._retry = self._retry, True  # until the check and its apply succeed
                    applied = self._resync()
                    self._retry = retry and not applied
                    changed = changed and not applied
                if changed or self._retry:
                    self._retry = True
                    self.request()
                    self._retry = False
            except Exception as e:  # noqa: BLE001 - keep enforcing the last good ruleset; retry next round
                log.error("policy: %s", e)

    # ---- CNI hooks (called by the CNI server, before the reply) ----

    def pod_added(self, environ: Mapping[str, str], stdout: str) -> None:
        """Binds the pod from CNI_ARGS to the ADD result's addresses and applies; raises PolicyError."""
        args = parse_cni_args(environ.get("CNI_ARGS", ""))
        ns, name = args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")
        if not ns or not name:
            return  # not a Kubernetes pod: no Pod object can select it
        if not self.ready.wait(60):
            raise PolicyError("the policy engine is not ready yet")
        try:
            result = json.loads(stdout)
            ips = tuple(netaddr.IPAddress(ip["address"].split("/")[0]) for ip in result.get("ips", []))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PolicyError(f"unreadable ADD result: {e}") from None
        cid = environ.get("CNI_CONTAINERID", "")
        with self._lock:
            before = self.bindings.get(cid)
            self.bindings[cid] = Binding(ns, name, ips)
            self._save_bindings()
        try:
            self.refresh()  # the pod's verdicts follow the sources as they are now, not as last polled
            self.request()
        except Exception:
            with self._lock:  # the ADD is rolled back: forget the pod again
                if before is None:
                    self.bindings.pop(cid, None)
                else:
                    self.bindings[cid] = before
                self._save_bindings()
            raise
        log.info("pod %s/%s (%s) bound to %s", ns, name, cid[:12], ", ".join(map(str, ips)))

    def pod_deleted(self, environ: Mapping[str, str]) -> None:
        cid = environ.get("CNI_CONTAINERID", "")
        with self._lock:
            gone = self.bindings.pop(cid, None)
            if gone is not None:
                self._save_bindings()
        if gone is not None:
            self.refresh()  # takes in the released lease too, so the loop does not start an apply of its own
            self.request()
            log.info("pod %s/%s (%s) unbound", gone.namespace, gone.name, cid[:12])

    # ---- state ----

    def _load_bindings(self) -> dict[str, Binding]:
        try:
            data = json.loads(self.state_file.read_text())
            return {cid: Binding.from_json(b) for cid, b in data.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError, netaddr.AddrFormatError) as e:
            log.error("%s is unreadable (%s); pods attached before are known again from their Pod objects",
                      self.state_file, e)
            return {}

    def _save_bindings(self) -> None:
        write_atomic(self.state_file, json.dumps({c: b.to_json() for c, b in sorted(self.bindings.items())}))

    def _leases_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.lease_dir.stat()
            return st.st_mtime_ns, st.st_ino
        except FileNotFoundError:
            return None

    def _port_bindings(self) -> list[PortBinding]:
        """Every pod veth on this node and its addresses, from the IPAM leases (also of pods attached
        while weftd was away)."""
        ports: dict[str, list[netaddr.IPAddress]] = {}
        try:
            entries = list(os.scandir(self.lease_dir))
        except FileNotFoundError:
            return []
        known, self._leases = self._leases, {}
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
                stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                kept = known.get(e.name)
                if kept is not None and kept[0] == stamp:  # leases are written once, by a rename or O_EXCL
                    _, ip, veth = kept
                else:
                    ip = netaddr.IPAddress(e.name)
                    with open(e.path, "rb") as f:
                        cid, _, ifname = f.read().decode().partition("\r\n")
                    cid, ifname = cid.strip(), ifname.strip()
                    veth = host_veth_name(cid, ifname) if cid and ifname else ""
            except (ValueError, netaddr.AddrFormatError, OSError, UnicodeDecodeError):
                continue
            self._leases[e.name] = (stamp, ip, veth)
            if veth:
                ports.setdefault(veth, []).append(ip)
        return [PortBinding(name, tuple(sorted(ips))) for name, ips in sorted(ports.items())]

    def state(self) -> tuple[State, list[model.Pod]]:
        with self._source_lock:
            objects = self.source.objects()
        state = State.of(objects.values())
        pods = {p.key: p for p in state.pods}
        with self._lock:
            bindings = list(self.bindings.values())
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
            compiled = compile_ruleset(state, local, self._port_bindings(), self.nflog_group, self._cache)
            self._pods = state.pods
            if compiled.text != self._applied_text:
                before = self._send(compiled, full)
                with self._lock:
                    self._dropped = self._accumulate(self._dropped, before)
                self._applied_text = compiled.text
                if full:  # at the start and at a resync: what the kernel holds now is what the next one expects
                    self._snapshot, self._unchecked = listing(), False
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
        with self._source_lock:
            m.invalid.set(self.source.error_count())
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
            before = read_counters(change.removed | change.reset)
            status, _, err = nft.run(change.commands) if change.commands else (0, "", "")
            if status == 0:
                return before
            log.warning("policy: applying the change alone failed (%s); replacing the tables in full", err.strip())
        # what the drop counters held goes into the totals before the replace zeroes them (also at a resync,
        # which forgets _applied_text); only tables weftd did not apply yet are not read
        before = read_counters() if self.last is not None else {}
        status, _, err = nft.run(transaction(compiled.text))
        if status != 0:
            raise PolicyError(f"nft: {err.strip()}")
        return before

    def _resync(self) -> bool:
        """The periodic full check. If anything was applied since the last look at the kernel, or the tables
        differ from that look, both tables are replaced in full (the leases read anew) and listed again.
        True if it applied."""
        with self._apply_lock:
            if self._snapshot is None:
                return False  # nothing applied yet: the loop's retry applies in full
            seen = listing()
            unchecked = self._unchecked
            if not unchecked and seen == self._snapshot:
                return False
            applied = self._applied_text
            self._applied_text = None
            self._leases.clear()
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

    def _accumulate(self, base: dict[tuple[str, str], tuple[int, int]],
                    counters: Mapping[str, tuple[int, int]]) -> dict[tuple[str, str], tuple[int, int]]:
        """`base` plus the kernel's counters, attributed through the last applied ruleset's chains."""
        out = dict(base)
        chains = self.last.chain_policies if self.last is not None else {}
        for name, (packets, octets) in counters.items():
            owners = [(SPOOFED, "")] if name == SPOOFED else \
                [(pid, "ingress" if name.startswith("i_") else "egress") for pid in chains.get(name, ())]
            for key in owners:
                p0, b0 = out.get(key, (0, 0))
                out[key] = (p0 + packets, b0 + octets)
        return out

    def drop_totals(self, counters: Mapping[str, tuple[int, int]]) -> dict[tuple[str, str], tuple[int, int]]:
        with self._lock:
            return self._accumulate(self._dropped, counters)

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



def listing() -> str:
    """Both policy tables as the kernel has them, without handles and counter values (which change), in an
    order that does not depend on how they were built (in full, or change by change): objects by kind and
    name, rules in their chain's order, set elements sorted."""
    out = []
    for family in ("inet", "bridge"):
        status, text, _ = nft.run(f"list table {family} {TABLE}", json_output=True)
        if status != 0:
            out.append(f"{family}: missing")
            continue
        items: list[tuple[tuple[str, str, int], str]] = []
        position: dict[str, int] = {}
        for item in json.loads(text).get("nftables", []):
            kind, body = next(iter(item.items()))
            if kind in ("metainfo", "counter"):
                continue
            body = {k: v for k, v in body.items() if k != "handle"}
            if isinstance(body.get("elem"), list):
                body["elem"] = sorted(body["elem"], key=lambda e: json.dumps(e, sort_keys=True))
            if kind == "rule":
                chain = str(body.get("chain", ""))
                position[chain] = position.get(chain, 0) + 1
                key = ("rule", chain, position[chain])
            else:
                key = (kind, str(body.get("name", "")), 0)
            items.append((key, json.dumps({kind: body}, sort_keys=True)))
        out += [f"{family} {line}" for _, line in sorted(items)]
    return "\n".join(out)


def remove_tables() -> None:
    """`weftd uninstall`: the policy tables go with everything else weftd made."""
    nft.run(f"delete table inet {TABLE}")
    nft.run(f"delete table bridge {TABLE}")
