"""NetworkPolicy at cluster scale, on the production path: `python -m bench.policy_bench scale [pods ...]`.

For each cluster size (100, 1,000, 3,000 and 10,000 pods spread over 100 nodes, so about 1% on the node under
test, in 50 namespaces, with 1,000 policies of every kind: tests/policy_world.py), two simulated nodes run the
frozen weftd (WEFT_BUNDLE) serving the frozen `weft` shim, one with the objects as a policy directory
(--policy-dir, one file per pod, written as the API would change them) and one with no policy source. It
measures:

- a local pod's ADD and DEL through libcni (cnidrive, with K8S_POD_* args), interleaved between the two
  nodes, p50 and p95 and their ratios; the pod's object is there (no address) before its ADD, gets the address
  after it, and goes after its DEL, as a kubelet reports it; meanwhile other nodes' pods churn (created,
  deleted, relabelled, one at a time every CHURN_INTERVAL);
- the latency of a remote pod's create, delete or label change: from the start of the write that makes it
  visible (a file's rename; the API request with --source kube) to the kernel holding it, seen by `nft
  monitor` in the node's namespace (the change is in when the elements holding the pod's address change),
  p50 and p95, and weftd's CPU per event (utime + stime over a batch of
  events one after the other, everything weftd did meanwhile included), with the full replaces of the tables
  seen during the batch;
- full apply time, from weftd's weft_policy_apply_seconds: the start, and a resync forced by a set added to
  weftd's table behind its back;
- weftd's RSS (and peak) at the end.

`--source kube` does all this against a real kube-apiserver (tests/kubeapi) instead of a directory.
With `throughput` among the arguments (or by default when no size is given), pod-to-pod iperf3 with the 1,000
policies in force against without (bench/policy_bench.throughput). Writes JSON and a PNG of the curve under
.build/bench/. WEFT_BENCH_SCALE_ROUNDS (ADD/DEL rounds per size, default 20) and WEFT_BENCH_SCALE_EVENTS
(remote events per batch, default 30) shrink it. Nothing here has a pass mark.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import select
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.plugin_bench import BUNDLE, Variant, drive, install_frozen, percentile, start_weftd
from bench.weftd_bench import cpu_seconds
from tests.lab import ROOT, SOCKET_DIR, Lab, Netns, Node, proc_kib, weftd_pid
from tests.policy_world import Change, World, WorldPod
from weftlib.kernel.netns import NetNS

SIZES = (100, 1000, 3000, 10_000)
NODES, NAMESPACES, POLICIES = 100, 50, 1000
ROUNDS = int(os.environ.get("WEFT_BENCH_SCALE_ROUNDS", "20"))
EVENTS = int(os.environ.get("WEFT_BENCH_SCALE_EVENTS", "30"))
CHURN_INTERVAL = 0.2  # seconds between two remote pod changes while local pods are ADDed and DELeted
POD_AGE = 0.2  # seconds between a round's ADDs and its DELs
EVENT_TIMEOUT = 300.0
ATTEMPTS = 3  # of an ADD or DEL that fails, as a runtime retries it
SETUP_WORKERS = 8  # concurrent ADDs of the pods a node has before the measurement
OUT_DIR = ROOT / ".build" / "bench"


# ---- the kernel, as nft monitor tells it ----

Interval = tuple[int, int]
_EVENT = re.compile(r"^(add|delete|flush) (table|set|map|element) (\S+) (\S+)(?: (\S+))?(?: \{ ?(.*?) ?\})?\s*$")


def _intervals(element: str) -> list[Interval]:
    """The addresses an element's key names (each part of a concatenation; a map element's key only)."""
    out = []
    for part in element.split(" : ", 1)[0].split(" . "):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.append((int(ipaddress.ip_address(lo)), int(ipaddress.ip_address(hi))))
            elif "/" in part:
                net = ipaddress.ip_network(part, strict=False)
                out.append((int(net.network_address), int(net.broadcast_address)))
            else:
                a = int(ipaddress.ip_address(part))
                out.append((a, a))
        except ValueError:
            continue
    return out


def _elements(body: str) -> list[str]:
    return [" ".join(e.split()) for e in body.split(",") if e.strip()]


class KernelWatch:
    """Every set and map element of a node's nftables, kept from a listing and `nft monitor`: which elements
    hold an address, and when that changed. Lines are applied as they come; waiters are checked after each
    read, so all of one transaction's notifications are in before a waiter is told."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.sets: dict[tuple[str, str, str], dict[str, list[Interval]]] = {}
        self.cond = threading.Condition()
        self.replaces = 0  # inet tables deleted: full replaces seen
        self.lost = 0
        self.waiters: list[Waiter] = []
        self.seen = 0.0
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "stdbuf", "-oL", "nft", "monitor"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._list()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.thread.join(10)

    def _list(self) -> None:
        """Adds what `nft list ruleset` shows (after the monitor started: later events apply on top)."""
        text = self.ns.run("nft", "list", "ruleset", timeout=300).stdout
        sets: dict[tuple[str, str, str], dict[str, list[Interval]]] = {}
        table = ("", "")
        name = ""
        body: list[str] | None = None
        for line in text.splitlines():
            s = line.strip()
            if m := re.match(r"^table (\S+) (\S+) \{", s):
                table = (m[1], m[2])
            elif m := re.match(r"^(?:set|map) (\S+) \{", s):
                name = m[1]
                sets[(*table, name)] = {}
            elif s.startswith("elements = {"):
                body = [s[len("elements = {"):]]
            elif body is not None:
                body.append(s)
            if body is not None and body[-1].endswith("}"):
                joined = " ".join(body)[:-1]
                sets[(*table, name)] = {e: _intervals(e) for e in _elements(joined)}
                body = None
        with self.cond:
            self.sets.update(sets)

    def _apply(self, line: str) -> None:
        m = _EVENT.match(line)
        if m is None:
            return
        verb, what, family, table, name, body = m.groups()
        if what == "table":
            if verb in ("delete", "flush"):
                self.replaces += verb == "delete" and family == "inet"
                for key in [k for k in self.sets if k[:2] == (family, table)]:
                    if verb == "delete":
                        del self.sets[key]
                    else:
                        self.sets[key] = {}
            return
        key = (family, table, name or "")
        if what in ("set", "map"):
            if verb == "add":
                self.sets[key] = {}
            elif verb == "delete":
                self.sets.pop(key, None)
            else:
                self.sets[key] = {}
            return
        elements = self.sets.setdefault(key, {})
        for e in _elements(body or ""):
            if verb == "add":
                elements[e] = _intervals(e)
            else:
                elements.pop(e, None)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        rest = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return
            while select.select([fd], [], [], 0)[0]:  # take in all that is there already
                more = os.read(fd, 1 << 20)
                if not more:
                    break
                chunk += more
            now = time.perf_counter()
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            relist = False
            with self.cond:
                for raw in lines:
                    line = raw.decode(errors="replace")
                    if line.startswith("# new generation"):  # a transaction's end: its elements are all in
                        self._settle(now)
                    elif "lost" in line.lower() or line.startswith(("netlink", "Error")):
                        self.lost += 1
                        relist = True
                    else:
                        self._apply(line)
            if relist:
                self._list()
                with self.cond:
                    self._settle(time.perf_counter())

    def _settle(self, now: float) -> None:
        """At a transaction's end: tells each waiter whose address's elements now differ."""
        self.seen = now
        for w in self.waiters:
            if w.done is None and self._signature(w.ip) != w.before:
                w.done = now
        self.cond.notify_all()

    def _signature(self, ip: int) -> tuple[str, ...]:
        return tuple(sorted(e for els in self.sets.values() for e, ivs in els.items()
                            if any(lo <= ip <= hi for lo, hi in ivs)))

    def expect(self, ip: str) -> Waiter:
        """Starts looking for a change of the elements that hold `ip` (every element, as nft prints it, without
        set names: a set renamed with the same content is the same), from what they are now."""
        a = int(ipaddress.ip_address(ip))
        with self.cond:
            w = Waiter(a, self._signature(a))
            self.waiters.append(w)
        return w

    def wait(self, w: Waiter, timeout: float = EVENT_TIMEOUT) -> float:
        """When (perf_counter) the transaction that changed the elements holding the waiter's address ended."""
        deadline = time.monotonic() + timeout
        with self.cond:
            try:
                while w.done is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"the kernel did not change for {ipaddress.ip_address(w.ip)} within "
                                           f"{timeout} s")
                    self.cond.wait(left)
                return w.done
            finally:
                self.waiters.remove(w)


@dataclass
class Waiter:
    ip: int
    before: tuple[str, ...]
    done: float | None = None


# ---- the cluster's objects, as files in the policy directory ----

class Source(Protocol):
    """Where weftd reads the cluster's objects, and how the benchmark changes them."""

    def write_world(self, world: World) -> None: ...

    def apply(self, change: Change) -> float:
        """Makes the change; returns when (perf_counter) the write that makes it visible began."""
        ...

    def weftd_args(self) -> tuple[str, ...]: ...

    def underlay(self, index: int) -> tuple[Netns, str] | None: ...

    def close(self) -> None: ...


class PolicyFiles:
    """The --policy-dir source: Namespaces in one file, each namespace's policies in one, each pod in its own;
    every write is a rename, so weftd never reads half a file."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def weftd_args(self) -> tuple[str, ...]:
        return ("--policy-dir", str(self.dir))

    def underlay(self, index: int) -> tuple[Netns, str] | None:
        return None

    def close(self) -> None:
        pass

    def _write(self, name: str, data: Any) -> float:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        t = time.perf_counter()
        os.replace(tmp, self.dir / name)
        return t

    def write_world(self, world: World) -> None:
        self._write("namespaces.json", {"kind": "List", "items": world.namespace_objects()})
        by_ns: dict[str, list[Any]] = {}
        for pol in world.policy_objects():
            by_ns.setdefault(pol["metadata"]["namespace"], []).append(pol)
        for ns, pols in by_ns.items():
            self._write(f"policies-{ns}.json", {"kind": "List", "items": pols})
        for pod in world.pods.values():
            self._write(self.pod_file(pod.namespace, pod.name), pod.object())

    @staticmethod
    def pod_file(namespace: str, name: str) -> str:
        return f"pod-{namespace}-{name}.json"

    def apply(self, change: Change) -> float:
        if change.kind != "Pod":
            raise ValueError(f"only pod changes are written one by one, not {change.kind}")
        if change.obj is None:
            t = time.perf_counter()
            (self.dir / self.pod_file(change.namespace, change.name)).unlink()
            return t
        return self._write(self.pod_file(change.namespace, change.name), change.obj)


class ApiObjects:
    """The kube source (--policy-kube): the objects in a real kube-apiserver (tests/kubeapi), changed through its
    API as the scheduler, the kubelet and users change them. Nodes reach it across `underlay` (bridge br0)."""

    WORKERS = 8

    def __init__(self, kube: Any, underlay: Netns, kubeconfig: Path) -> None:
        self.kube = kube
        self.net = underlay
        self.kubeconfig = kubeconfig

    def weftd_args(self) -> tuple[str, ...]:
        return ("--policy-kube", "--kubeconfig", str(self.kubeconfig))

    def underlay(self, index: int) -> tuple[Netns, str] | None:
        return self.net, f"192.168.77.{20 + index}/24"

    def _call(self, method: str, path: str, body: Any = None, content: str = "application/json") -> Any:
        pm = self.kube.admin.rest_client.pool_manager
        r = pm.request(method, self.kube.admin.configuration.host + path,
                       body=None if body is None else json.dumps(body),
                       headers={"Content-Type": content, "Accept": "application/json"}, retries=False, timeout=120)
        if r.status >= 300 and not (method == "DELETE" and r.status == 404) and r.status != 409:
            raise RuntimeError(f"{method} {path}: {r.status} {r.data[:300]!r}")
        return json.loads(r.data or b"null")

    def _pod(self, obj: dict[str, Any]) -> float:
        meta = obj["metadata"]
        body = {k: v for k, v in obj.items() if k != "status"}
        body["spec"] = {**obj["spec"], "containers": [{**c, "image": "weft.invalid/none"}
                                                      for c in obj["spec"]["containers"]]}
        t = time.perf_counter()
        self._call("POST", f"/api/v1/namespaces/{meta['namespace']}/pods", body)
        return self._status(obj) if "podIP" in obj["status"] else t

    def _status(self, obj: dict[str, Any]) -> float:
        meta = obj["metadata"]
        t = time.perf_counter()
        self._call("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                   {"status": obj["status"]}, "application/merge-patch+json")
        return t

    def write_world(self, world: World) -> None:
        from concurrent.futures import ThreadPoolExecutor

        for obj in world.namespace_objects():
            self._call("POST", "/api/v1/namespaces", obj)
            self._call("PATCH", f"/api/v1/namespaces/{obj['metadata']['name']}", {"metadata": obj["metadata"]},
                       "application/merge-patch+json")
        with ThreadPoolExecutor(self.WORKERS) as pool:
            list(pool.map(lambda o: self._call(
                "POST", f"/apis/networking.k8s.io/v1/namespaces/{o['metadata']['namespace']}/networkpolicies", o),
                world.policy_objects()))
            list(pool.map(self._pod, [p.object() for p in world.pods.values()]))

    def apply(self, change: Change) -> float:
        path = f"/api/v1/namespaces/{change.namespace}/pods"
        if change.what == "create" and change.obj is not None:
            return self._pod(change.obj)
        if change.what == "update" and change.obj is not None:
            return self._status(change.obj)
        t = time.perf_counter()
        if change.obj is None:
            self._call("DELETE", f"{path}/{change.name}?gracePeriodSeconds=0")
        else:
            self._call("PATCH", f"{path}/{change.name}",
                       [{"op": "replace", "path": "/metadata/labels", "value": change.obj["metadata"]["labels"]}],
                       "application/json-patch+json")
        return t

    def close(self) -> None:
        """Every pod and policy goes (the namespaces stay for the next size: the same ones)."""
        for ns in self._call("GET", "/api/v1/namespaces")["items"]:
            name = ns["metadata"]["name"]
            if name.startswith("ns"):
                self._call("DELETE", f"/api/v1/namespaces/{name}/pods?gracePeriodSeconds=0")
                self._call("DELETE", f"/apis/networking.k8s.io/v1/namespaces/{name}/networkpolicies")


# ---- the nodes ----

@dataclass
class BenchNode:
    variant: Variant
    times: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # per verb: attempts that failed

    @property
    def pid(self) -> int:
        assert self.variant.socket is not None
        pid = weftd_pid(self.variant.socket)
        if pid is None:
            raise RuntimeError(f"weftd of {self.variant.name} is gone")
        return pid

    @property
    def conflist(self) -> Path:
        return self.variant.node.dir / "weftd-net.d" / "10-weft.conflist"

    def metrics(self, *names: str) -> list[float]:
        """The values of `names` in one scrape of weftd's /metrics (0 for one it does not show)."""
        with NetNS(self.variant.node.ns.path).entered():
            # a weftd busy with a full apply at 10,000 pods answers a scrape only after it
            text = urllib.request.urlopen("http://127.0.0.1:9808/metrics", timeout=300).read().decode()
        return [float(m[1]) if (m := re.search(rf"^{name} (\S+)$", text, re.M)) else 0.0 for name in names]

    def applies(self) -> tuple[float, float]:
        """weft_policy_apply_seconds: (count, sum)."""
        count, total = self.metrics("weft_policy_apply_seconds_count", "weft_policy_apply_seconds_sum")
        return count, total

    def quiet(self, seconds: float = 3.0, timeout: float = 600) -> tuple[float, float]:
        """Waits until no apply has ended for `seconds`; returns applies() then."""
        deadline = time.monotonic() + timeout
        last, since = self.applies(), time.monotonic()
        while time.monotonic() - since < seconds:
            if time.monotonic() > deadline:
                raise TimeoutError(f"weftd of {self.variant.name} still applying after {timeout} s")
            time.sleep(0.5)
            now = self.applies()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def _verb(self, verb: str, pod: WorldPod, netns: Netns) -> tuple[float, str]:
        """One libcni operation as a runtime makes it: an ADD or DEL that fails (weftd's answer did not come within
        the shim's timeout: "try again later") is made again, after a DEL if it was an ADD, up to ATTEMPTS times.
        Returns the ms until it succeeded, all attempts included, and cnidrive's output."""
        env = {"CNIDRIVE_ARGS": f"K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name}"}
        t = time.perf_counter()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                _, p = drive(self.variant, verb, self.conflist, cid(pod), netns.path, **env)
                return (time.perf_counter() - t) * 1000, p.stdout
            except RuntimeError as e:
                self.failures[verb] = self.failures.get(verb, 0) + 1
                print(f"  {self.variant.name}: {verb} of {pod.namespace}/{pod.name} failed (attempt {attempt}): "
                      f"{str(e)[-160:]}", flush=True)
                if attempt == ATTEMPTS:
                    raise
                if verb == "add":
                    self._verb("del", pod, netns)
        raise AssertionError("unreachable")

    def add(self, pod: WorldPod, netns: Netns, record: bool = True) -> str:
        took, out = self._verb("add", pod, netns)
        if record:
            self.times.setdefault("add", []).append(took)
        return str(json.loads(out)["ips"][0]["address"].split("/")[0])

    def delete(self, pod: WorldPod, netns: Netns) -> None:
        took, _ = self._verb("del", pod, netns)
        self.times.setdefault("del", []).append(took)

    def stop(self) -> None:
        if self.variant.weftd is not None:
            self.variant.weftd.terminate()
            self.variant.weftd.wait(60)


def cid(pod: WorldPod) -> str:
    return hashlib.sha256(f"{pod.namespace}/{pod.name}".encode()).hexdigest()


# ---- one size ----

class Scale:
    def __init__(self, pods: int, api: Callable[[], ApiObjects] | None = None) -> None:
        """`api`: the kube source (else a policy directory)."""
        self.pods = pods
        self.lab = Lab(Path(os.environ.get("TMPDIR", "/tmp")) / f"weft-scale-{os.getpid()}-{pods}")
        self.lab.base.mkdir(parents=True)
        bin_dir = install_frozen(self.lab)
        self.world = World.build(pods=pods, nodes=NODES, namespaces=NAMESPACES, policies=POLICIES,
                                 local_node="policy")
        self.source: Source = api() if api is not None else PolicyFiles(self.lab.base / "policies")
        t = time.perf_counter()
        self.source.write_world(self.world)
        self.written_s = time.perf_counter() - t
        self.lock = threading.Lock()  # the world and its files: the churn thread and the main one both change them
        self.nodes: dict[str, BenchNode] = {}
        for name in ("plain", "policy"):
            node = self.lab.node(name)
            self.nodes[name] = BenchNode(Variant(name, Node(node.ns, node.dir, bin_dir, self.lab), "frozen"))
        self.watch: KernelWatch | None = None
        self.events: dict[str, list[float]] = {}
        self.churn_latency: list[float] = []
        self.setup_failures = 0
        self.out: dict[str, Any] = {"pods": pods, "policies": len(self.world.policies)}

    @property
    def policy(self) -> BenchNode:
        return self.nodes["policy"]

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        for n in self.nodes.values():
            try:
                n.stop()
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.lab.close()
        self.source.close()

    def start(self) -> dict[str, Any]:
        SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        start_weftd(self.lab, self.nodes["plain"].variant)
        t = time.perf_counter()
        start_weftd(self.lab, self.policy.variant, self.source.weftd_args(), self.source.underlay(len(str(self.pods))))
        ready = time.perf_counter() - t
        count, total = self.policy.applies()
        return {"start_to_ready_s": round(ready, 2), "start_applies": count, "start_apply_s": round(total, 3)}

    def setup_local(self) -> int:
        """ADDs the node's pods that the world has on both nodes alike, SETUP_WORKERS at a time as a kubelet
        starting a node's pods does, then reports their addresses."""
        from concurrent.futures import ThreadPoolExecutor

        local = self.world.local_pods()
        for n in self.nodes.values():
            nets = [self.lab.netns("l") for _ in local]  # here: Lab.netns names them by count
            with ThreadPoolExecutor(SETUP_WORKERS) as pool:
                ips = list(pool.map(lambda pod, ns, n=n: n.add(pod, ns, record=False), local, nets))
            if n is self.policy:
                for pod, ip in zip(local, ips, strict=True):
                    self.source.apply(self.world.assign(pod, ip))
        self.setup_failures = sum(sum(n.failures.values()) for n in self.nodes.values())
        for n in self.nodes.values():
            n.failures.clear()
        return len(local)

    # -- remote pods --

    def remote_event(self, kind: str) -> float:
        """One change of another node's pod; seconds until the kernel holds it."""
        assert self.watch is not None
        with self.lock:
            remote = [p for p in self.world.remote_pods() if p.ip is not None]
            if kind == "create":
                pod, change = self.world.new_pod()
            else:
                pod = self.world.rnd.choice(remote)
                change = self.world.delete_pod(pod) if kind == "delete" else \
                    self.world.set_probe(pod, "probe" not in pod.labels)
            assert pod.ip is not None
            w = self.watch.expect(pod.ip)
            t = self.source.apply(change)
        return self.watch.wait(w) - t

    def event_batch(self) -> dict[str, Any]:
        """EVENTS remote changes one after another, nothing else happening: latency, and weftd's CPU."""
        assert self.watch is not None
        pid = self.policy.pid
        replaces = self.watch.replaces
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        kinds = ("create", "relabel", "delete")
        for i in range(EVENTS):
            kind = kinds[i % 3]
            self.events.setdefault(kind, []).append(self.remote_event(kind))
        cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - t0
        every = [x for xs in self.events.values() for x in xs]
        return {"events": EVENTS, "latency_ms": spread_ms(every),
                **{f"{k}_ms": spread_ms(v) for k, v in self.events.items()},
                "cpu_ms_per_event": round(cpu / EVENTS * 1000, 1), "wall_s": round(wall, 2),
                "weftd_cpu_share": round(cpu / wall, 2), "full_replaces": self.watch.replaces - replaces}

    def churn(self, stop: threading.Event) -> None:
        kinds = ("create", "relabel", "delete")
        i = 0
        while not stop.wait(CHURN_INTERVAL):
            self.churn_latency.append(self.remote_event(kinds[i % 3]))
            i += 1

    # -- local pods --

    def add_del_rounds(self) -> None:
        """ROUNDS rounds: a new local pod ADDed on both nodes (which first alternates), then both DELeted."""
        order = list(self.nodes.values())
        for r in range(ROUNDS):
            pairs = []
            for n in order if r % 2 == 0 else order[::-1]:
                netns = self.lab.netns("p")
                if n is self.policy:
                    with self.lock:  # scheduled: the object is there, without an address yet
                        pod, change = self.world.new_pod(namespace=f"ns{r % NAMESPACES}", node=0)
                        self.source.apply(change)
                    ip = n.add(pod, netns)
                    with self.lock:
                        self.source.apply(self.world.assign(pod, ip))
                else:
                    pod = WorldPod(f"ns{r % NAMESPACES}", f"plain{r}", n.variant.name, {}, None, 8080)
                    n.add(pod, netns)
                pairs.append((n, pod, netns))
            time.sleep(POD_AGE)
            for n, pod, netns in pairs:
                n.delete(pod, netns)
                if n is self.policy:
                    with self.lock:
                        self.source.apply(self.world.delete_pod(pod))
            for _, _, netns in pairs:  # after the DELs: see plugin_bench.rounds
                subprocess.run(["ip", "netns", "del", netns.name], check=True)
                self.lab.namespaces.remove(netns)

    def forced_resync(self) -> dict[str, Any]:
        """Once weftd is idle, a set added to its table behind its back: the next resync replaces the tables in
        full. Its time is what weft_policy_apply_seconds grew by until the set is gone."""
        assert self.watch is not None
        count, total = self.policy.quiet()
        ns = self.policy.variant.node.ns
        added = ("inet", "weft_policy", "bench_resync")
        ns.run("nft", "add", "set", *added, "{ type ipv4_addr; }")
        t = time.perf_counter()
        deadline = time.monotonic() + 600
        with self.watch.cond:
            while added not in self.watch.sets:
                self.watch.cond.wait(1)
            while added in self.watch.sets:
                if not self.watch.cond.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("no resync within 600 s")
            seen = self.watch.seen - t
        count2, total2 = self.policy.applies()
        while count2 == count:  # the kernel holds it; the metric follows the apply's end
            time.sleep(0.1)
            count2, total2 = self.policy.applies()
        return {"resync_applies": count2 - count, "resync_apply_s": round((total2 - total) / (count2 - count), 3),
                "resync_done_after_s": round(seen, 1)}

    def run(self) -> dict[str, Any]:
        out = self.out  # filled as it goes: what a failed size measured before it failed is kept
        print(f"  {self.pods} pods: starting weftd", flush=True)
        out.update(self.start())
        out["local_pods"] = self.setup_local()
        out["setup_failures"] = self.setup_failures
        print(f"  {self.pods} pods: {out['local_pods']} local pods ADDed; start apply {out['start_apply_s']} s",
              flush=True)
        time.sleep(1)
        self.watch = KernelWatch(self.policy.variant.node.ns)
        out["events"] = self.event_batch()
        print(f"  {self.pods} pods: remote events {out['events']}", flush=True)
        stop = threading.Event()
        churner = threading.Thread(target=self._churn_guarded, args=(stop,), daemon=True)
        churner.start()
        try:
            self.add_del_rounds()
        finally:
            stop.set()
            churner.join(EVENT_TIMEOUT + 10)
        for verb in ("add", "del"):
            out[f"{verb}_ms"] = {n.variant.name: n.times.get(verb, []) for n in self.nodes.values()}
        out["churn_events"] = len(self.churn_latency)
        out["churn_latency_ms"] = spread_ms(self.churn_latency) if self.churn_latency else None
        for verb in ("add", "del"):
            plain, policy = self.nodes["plain"].times[verb], self.policy.times[verb]
            p50, p95 = statistics.median(plain), percentile(plain, 0.95)
            q50, q95 = statistics.median(policy), percentile(policy, 0.95)
            out[verb] = {"plain_p50_ms": round(p50, 1), "plain_p95_ms": round(p95, 1),
                         "policy_p50_ms": round(q50, 1), "policy_p95_ms": round(q95, 1),
                         "ratio_p50": round(q50 / p50, 2), "ratio_p95": round(q95 / p95, 2),
                         "plain_failures": self.nodes["plain"].failures.get(verb, 0),
                         "policy_failures": self.policy.failures.get(verb, 0)}
        out.update(self.forced_resync())
        pid = self.policy.pid
        out["rss_mib"] = round(proc_kib(pid) / 1024, 1)
        out["peak_rss_mib"] = round(proc_kib(pid, "VmHWM") / 1024, 1)
        out["plain_rss_mib"] = round(proc_kib(self.nodes["plain"].pid) / 1024, 1)
        out["watch_lost"] = self.watch.lost
        return out

    def _churn_guarded(self, stop: threading.Event) -> None:
        try:
            self.churn(stop)
        except Exception as e:  # noqa: BLE001 - the rounds go on; the report says the churn stopped
            print(f"  churn stopped: {e}", flush=True)


def spread_ms(xs: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(xs) * 1000, 1), "p95": round(percentile(xs, 0.95) * 1000, 1),
            "max": round(max(xs) * 1000, 1), "n": len(xs)}


def run_size(pods: int, api: Callable[[], ApiObjects] | None) -> dict[str, Any]:
    """One size's figures; if it cannot be measured (an ADD failing every attempt, a change never reaching the
    kernel), why, and the sizes after it are still measured."""
    scale = Scale(pods, api)
    try:
        out = scale.run()
        out["objects_written_s"] = round(scale.written_s, 1)
        return out
    except (RuntimeError, TimeoutError, AssertionError) as e:
        print(f"  {pods} pods: not measured in full: {e!r}; what was: {json.dumps(scale.out)[:2000]}", flush=True)
        return {**scale.out, "error": repr(e)[-500:]}
    finally:
        scale.close()


def run_sizes(sizes: tuple[int, ...], source: str, done: Callable[[list[dict[str, Any]]], None],
              ) -> list[dict[str, Any]]:
    """Each size's figures, `done` told of all so far after each."""
    out: list[dict[str, Any]] = []

    def each(pods: int, api: Callable[[], ApiObjects] | None) -> None:
        out.append(run_size(pods, api))
        done(out)

    if source == "dir":
        for n in sizes:
            each(n, None)
        return out
    from tests.kubeapi import KubeAPI

    lab = Lab(Path(os.environ.get("TMPDIR", "/tmp")) / f"weft-scale-{os.getpid()}-kube")
    lab.base.mkdir(parents=True)
    kube = None
    try:
        kube = KubeAPI(lab)
        kube.start()
        underlay = lab.netns("underlay")
        underlay.run("ip", "link", "add", "br0", "type", "bridge")
        underlay.run("ip", "link", "set", "br0", "up")
        kube.attach(underlay, "br0")
        kubeconfig = kube.kubeconfig(lab.base / "kubeconfig")
        for n in sizes:
            each(n, lambda: ApiObjects(kube, underlay, kubeconfig))
        return out
    finally:
        if kube is not None:
            kube.close()
        lab.close()


# ---- report ----

def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'pods':>6} {'local':>5} | {'ADD p50/p95 ms: none':>20} {'policy':>13} {'ratio':>11} | "
            f"{'DEL none':>13} {'policy':>13} {'ratio':>11} | {'event p50/p95 ms':>17} {'CPU ms/ev':>9} | "
            f"{'start s':>7} {'resync s':>8} | {'RSS MiB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        a, d, e = r["add"], r["del"], r["events"]
        lines.append(
            f"{r['pods']:>6} {r['local_pods']:>5} | "
            f"{a['plain_p50_ms']:>9.1f}/{a['plain_p95_ms']:<10.1f} "
            f"{a['policy_p50_ms']:>6.1f}/{a['policy_p95_ms']:<6.1f} {a['ratio_p50']:>5.2f}/{a['ratio_p95']:<5.2f} | "
            f"{d['plain_p50_ms']:>6.1f}/{d['plain_p95_ms']:<6.1f} "
            f"{d['policy_p50_ms']:>6.1f}/{d['policy_p95_ms']:<6.1f} {d['ratio_p50']:>5.2f}/{d['ratio_p95']:<5.2f} | "
            f"{e['latency_ms']['p50']:>8.1f}/{e['latency_ms']['p95']:<8.1f} {e['cpu_ms_per_event']:>9.1f} | "
            f"{r['start_apply_s']:>7.2f} {r['resync_apply_s']:>8.2f} | {r['rss_mib']:>7.1f}")
    for r in rows:
        failed = {f"{verb.upper()} {who}": r[verb][f"{who}_failures"] for verb in ("add", "del")
                  for who in ("plain", "policy") if r[verb][f"{who}_failures"]}
        if failed:
            lines.append(f"{r['pods']} pods: attempts that failed and were made again (in the times): "
                         + ", ".join(f"{k} {v}" for k, v in failed.items()))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["pods"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    fig.suptitle(title, fontsize=10)

    def curve(a: Any, ys: list[float], label: str, style: str = "-o") -> None:
        a.plot(x, ys, style, label=label)

    a = ax[0][0]
    for verb in ("add", "del"):
        for who, label, dash in (("plain", "no policy source", "--"), ("policy", "policy", "-")):
            for q, mark in (("p50", "o"), ("p95", "^")):
                curve(a, [r[verb][f"{who}_{q}_ms"] for r in rows], f"{verb.upper()} {q}, {label}", dash + mark)
    a.set(title="local pod ADD / DEL through weftd (ms)", yscale="log")
    a = ax[0][1]
    for verb in ("add", "del"):
        for q in ("p50", "p95"):
            curve(a, [r[verb][f"ratio_{q}"] for r in rows], f"{verb.upper()} {q}")
    a.axhline(1.25, color="grey", linestyle=":", label="goal 1.25")
    a.set(title="policy / no policy source (same run, interleaved)", yscale="log")
    a = ax[1][0]
    curve(a, [r["events"]["latency_ms"]["p50"] for r in rows], "remote event latency p50 (ms)")
    curve(a, [r["events"]["latency_ms"]["p95"] for r in rows], "remote event latency p95 (ms)")
    curve(a, [r["events"]["cpu_ms_per_event"] for r in rows], "weftd CPU per event (ms)", "-s")
    a.axhline(5, color="grey", linestyle=":", label="CPU goal 5 ms")
    a.set(title="remote pod create / relabel / delete", yscale="log")
    a = ax[1][1]
    curve(a, [r["start_apply_s"] for r in rows], "start apply (s)")
    curve(a, [r["resync_apply_s"] for r in rows], "forced resync apply (s)")
    a.axhline(2, color="grey", linestyle=":", label="goal 2 s")
    b = a.twinx()
    b.plot(x, [r["rss_mib"] for r in rows], "-s", color="tab:red", label="weftd RSS (MiB)")
    b.set_ylabel("MiB")
    b.legend(loc="lower right", fontsize=7)
    a.set(title="full apply (s) and RSS", yscale="log")
    for a in (ax[0][0], ax[0][1], ax[1][0], ax[1][1]):
        a.set_xscale("log")
        a.set_xlabel("pods cluster-wide (1% on the node)")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def commit() -> str:
    p = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return p.stdout.strip()[:72]


USAGE = """usage: python -m bench.policy_bench scale [SIZE ...] [--source dir|kube] [throughput]
  SIZE: pods cluster-wide (default 100 1000 3000 10000); WEFT_BENCH_SCALE_ROUNDS / _EVENTS set the samples"""


def main(args: list[str], throughput: Callable[..., dict[str, Any]]) -> int:
    known = {"--source", "dir", "kube", "throughput"}
    if any(a in ("-h", "--help") for a in args) or [a for a in args if not a.isdigit() and a not in known]:
        print(USAGE, file=sys.stderr)
        return 0 if any(a in ("-h", "--help") for a in args) else 2
    if not (BUNDLE / "weft").exists():
        print(f"no frozen bundle at {BUNDLE}: run `make build`", file=sys.stderr)
        return 2
    cnidrive = Path(os.environ.get("CNIDRIVE") or ROOT / ".build" / "cnidrive")
    if not os.access(cnidrive, os.X_OK):
        print(f"no cnidrive at {cnidrive}: run `make cnidrive`", file=sys.stderr)
        return 2
    sizes = tuple(int(a) for a in args if a.isdigit()) or SIZES
    source = args[args.index("--source") + 1] if "--source" in args else "dir"
    if source not in ("dir", "kube"):
        print("--source dir (a policy directory, the default) or kube (a kube-apiserver)", file=sys.stderr)
        return 2
    head = commit()
    print(f"NetworkPolicy at scale ({head}; bundle {BUNDLE}; source {source}): {NODES} nodes, {NAMESPACES} "
          f"namespaces, {POLICIES} policies; per size {ROUNDS} interleaved ADD/DEL rounds under churn (a remote pod "
          f"change every {CHURN_INTERVAL} s) and {EVENTS} remote pod changes alone; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jpath, ppath = OUT_DIR / f"policy-scale-{source}-{stamp}.json", OUT_DIR / f"policy-scale-{source}-{stamp}.png"
    out: dict[str, Any] = {"commit": head, "bundle": str(BUNDLE), "source": source, "rounds": ROUNDS,
                           "events": EVENTS, "churn_interval_s": CHURN_INTERVAL, "sizes": []}

    def write(measured: list[dict[str, Any]]) -> None:
        """The JSON and the PNG of what is measured so far, and this size's line of the table."""
        out["sizes"] = measured
        rows = [r for r in measured if "error" not in r]
        jpath.write_text(json.dumps(out, indent=1, sort_keys=True))
        if rows:
            plot(rows, ppath, f"NetworkPolicy at scale, {POLICIES} policies, {NODES} nodes, source {source}; {head}")
        if "error" not in measured[-1]:
            print(table(measured[-1:]), flush=True)

    measured = run_sizes(sizes, source, write)
    rows = [r for r in measured if "error" not in r]
    if "throughput" in args or not [a for a in args if a.isdigit()]:
        print("NetworkPolicy: iperf3 TCP, pod on n1 to pod on n2, without and with the 1,000 policies of "
              f"{max(sizes)} pods", flush=True)
        world = World.build(pods=max(sizes), nodes=NODES, namespaces=NAMESPACES, policies=POLICIES, local_node="n2")
        try:
            out["throughput"] = throughput(world.objects())
        except (RuntimeError, AssertionError) as e:
            print(f"  throughput not measured: {str(e)[-300:]}", flush=True)
        jpath.write_text(json.dumps(out, indent=1, sort_keys=True))
    print()
    print(table(rows))
    for r in measured:
        if "error" in r:
            print(f"{r['pods']} pods: not measured: {r['error'][-200:]}")
    if "throughput" in out:
        t = out["throughput"]
        print(f"throughput with {POLICIES} policies / without: {t['ratio']:.3f} ({t['with_gbps']} / "
              f"{t['without_gbps']} Gbit/s; {t['rules']} rules on the server's node)")
    print(f"wrote {jpath}" + (f" and {ppath}" if rows else ""))
    print(json.dumps({"policy_scale": out}, sort_keys=True))
    return 0
