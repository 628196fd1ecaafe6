"""The kube policy source at cluster scale, against a real kube-apiserver (tests/kubeapi): 10,000 pods in 50
namespaces listed in pages and watched, what it holds of them, and a watch whose version is gone.

The figures (list time, memory held, event latency) are printed; the assertions are generous bounds that tell
working from stalled."""

from __future__ import annotations

import base64
import gc
import json
import logging
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client

from tests.cluster import Cluster
from tests.kubeapi import ETCD_URL, KubeAPI, in_netns
from tests.test_kube import join, kube_cluster, weft_token  # noqa: F401 - fixtures
from weftd import kubeclient
from weftd.policy import model
from weftd.policy.kube import KubeSource

PODS = 10_000
NAMESPACES = 50
WORKERS = 10  # the admin client's connection pool


def send(kube: KubeAPI, calls: list[tuple[str, str, Any]]) -> None:
    """Requests as admin, WORKERS at a time: (method, path, body); a PATCH is a merge patch."""
    pm, host = kube.admin.rest_client.pool_manager, kube.admin.configuration.host

    def one(call: tuple[str, str, Any]) -> None:
        method, path, body = call
        kind = "application/merge-patch+json" if method == "PATCH" else "application/json"
        r = pm.request(method, host + path, body=None if body is None else json.dumps(body),
                       headers={"Content-Type": kind, "Accept": "application/json"}, retries=False, timeout=60)
        assert 200 <= r.status < 300, (method, path, r.status, r.data[:300])

    with ThreadPoolExecutor(WORKERS) as ex:
        list(ex.map(one, calls))


def pod_body(i: int) -> dict[str, Any]:
    return {"metadata": {"name": f"p{i}", "labels": {"app": f"app{i % 40}", "tier": ("web", "db", "cache")[i % 3],
                                                      "pod": f"p{i}"}},
            "spec": {"nodeName": f"node{i % 100}", "automountServiceAccountToken": False,
                     "containers": [{"name": "c", "image": "weft.invalid/none",
                                     "ports": [{"name": "http", "containerPort": 8080},
                                               {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]}}


def ip(i: int) -> str:
    return f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}"


def status(i: int) -> dict[str, Any]:
    return {"status": {"phase": "Running", "podIP": ip(i), "podIPs": [{"ip": ip(i)}]}}


def ns_of(i: int) -> str:
    return f"s{i % NAMESPACES}"


def make_pods(kube: KubeAPI, numbers: range) -> None:
    send(kube, [("POST", f"/api/v1/namespaces/{ns_of(i)}/pods", pod_body(i)) for i in numbers])
    send(kube, [("PATCH", f"/api/v1/namespaces/{ns_of(i)}/pods/p{i}/status", status(i)) for i in numbers])


@pytest.fixture(scope="module")
def cluster_objects(kube_api: KubeAPI) -> Iterator[KubeAPI]:
    """PODS pods with their addresses, in NAMESPACES namespaces (created once for the module)."""
    kube = kube_api
    t = time.monotonic()
    send(kube, [("POST", "/api/v1/namespaces", {"metadata": {"name": f"s{n}", "labels": {"team": f"t{n % 5}"}}})
                for n in range(NAMESPACES)])
    make_pods(kube, range(PODS))
    print(f"\n{PODS} pods created with their status in {time.monotonic() - t:.1f}s")
    try:
        yield kube
    finally:
        for n in range(NAMESPACES):
            kube.delete_namespace(f"s{n}")


def source(kube: KubeAPI, stop: threading.Event) -> KubeSource:
    api = kube.api_client()
    return KubeSource(core=client.CoreV1Api(api), networking=client.NetworkingV1Api(api), stop=stop)


class Follower:
    """poll() on a thread of its own, as the engine's loop calls it: when each key was last reported."""

    def __init__(self, src: KubeSource) -> None:
        self.src = src
        self.seen: dict[model.Key, float] = {}
        self.cond = threading.Condition()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            self.src.wait(0.5)
            keys = self.src.poll()
            now = time.monotonic()
            with self.cond:
                for k in keys:
                    self.seen[k] = now
                self.cond.notify_all()

    def until(self, keys: set[model.Key], after: float, timeout: float) -> float:
        """Waits until every key was reported after `after`; the time the last one was."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                missing = [k for k in keys if self.seen.get(k, 0) < after]
                if not missing:
                    return max(self.seen[k] for k in keys)
                left = deadline - time.monotonic()
                assert left > 0, f"{len(missing)} of {len(keys)} changes not reported in {timeout}s: {missing[:5]}"
                self.cond.wait(left)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def compact_etcd(kube: KubeAPI) -> None:
    """Compacts etcd's history up to its current revision, as the API server does every few minutes."""
    def call() -> None:
        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            req = urllib.request.Request(ETCD_URL + path, data=json.dumps(body).encode(), method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]

        rev = int(post("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": rev, "physical": True})

    in_netns(kube.ns.path, call)


class Expired:
    """A watch answer as the API server gives it when the version asked for is gone."""

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        yield b'{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure",' \
              b'"message":"too old resource version: 1 (2)","reason":"Expired","code":410}}\n'

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def test_a_gone_version_lists_again_and_reports_what_changed(kube_api: KubeAPI, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A watch told its version is gone (an ERROR event with code 410) lists again, in pages; when a page's
    continue token has expired too (etcd compacted under it: the server's own 410) the list starts over. poll()
    then reports the pods deleted and changed meanwhile, as the diff of the two lists."""
    kube = kube_api
    kube.create_namespace("gone")
    monkeypatch.setattr(kubeclient, "PAGE", 50)
    stop = threading.Event()
    try:
        send(kube, [("POST", "/api/v1/namespaces/gone/pods", {**pod_body(i), "metadata": {"name": f"g{i}"}})
                    for i in range(200)])
        src = source(kube, stop)
        lister = src.kinds["Pod"]
        calls: list[dict[str, Any]] = []
        steps: list[str] = []

        def relabel(*numbers: int) -> list[tuple[str, str, Any]]:
            return [("PATCH", f"/api/v1/namespaces/gone/pods/g{i}", {"metadata": {"labels": {"x": "y"}}})
                    for i in numbers]

        def wrapped(**kwargs: Any) -> Any:
            calls.append(kwargs)
            if kwargs.get("watch") and not steps:
                # Meanwhile 10 pods are deleted and 5 relabelled, and the watch is told its version is gone.
                send(kube, [("DELETE", f"/api/v1/namespaces/gone/pods/g{i}?gracePeriodSeconds=0", None)
                            for i in range(10)] + relabel(*range(10, 15)))
                steps.append("watch expired")
                return Expired()
            if kwargs.get("_continue") and steps == ["watch expired"]:
                send(kube, relabel(15))  # a revision after the list's: compacting removes the list's own
                compact_etcd(kube)
                steps.append("compacted")
            return lister(**kwargs)

        src.kinds["Pod"] = wrapped
        caplog.set_level(logging.INFO, "weftd")
        first = src.poll()
        assert {k for k in first if k[1] == "gone"} == {("Pod", "gone", f"g{i}") for i in range(200)}
        want = {("Pod", "gone", f"g{i}") for i in range(16)}
        deadline = time.monotonic() + 60
        got: set[model.Key] = set()
        while not want <= got:
            assert time.monotonic() < deadline, f"not reported: {want - got}; steps {steps}"
            src.wait(1)
            got |= {k for k in src.poll() if k[1] == "gone"}
        assert got == want
        assert not any(("Pod", "gone", f"g{i}") in src.objects() for i in range(10))
        relabelled = src.objects()[("Pod", "gone", "g15")]
        assert isinstance(relabelled, model.Pod) and relabelled.labels.get("x") == "y"
        # Lists from the start: the first, the one after the expired watch, the one after the expired token.
        starts = [c for c in calls if not c.get("watch") and not c.get("_continue")]
        assert len(starts) == 3 and steps == ["watch expired", "compacted"], (steps, calls)
        assert all(c.get("limit") == 50 for c in starts)
        assert sum(bool(c.get("_continue")) for c in calls) >= 7  # 4 pages a list, and the expired one
        said = [r.getMessage() for r in caplog.records if "410" in r.getMessage()]
        watched = next(c["resource_version"] for c in calls if c.get("watch"))
        assert said == [f"Pod list/watch: resourceVersion {watched} is gone (410: too old resource version: 1 (2)): "
                        "listing again",
                        "Pod list/watch: the list's continue token expired (410): listing again from the start"], said
    finally:
        stop.set()
        kube.delete_namespace("gone")


@pytest.mark.slow
@pytest.mark.long
def test_ten_thousand_pods_are_listed_and_watched(cluster_objects: KubeAPI) -> None:
    kube = cluster_objects
    stop = threading.Event()
    try:
        src = source(kube, stop)
        t, cpu = time.monotonic(), time.process_time()
        keys = src.poll()  # the first poll waits for every kind's list
        listed, cpu = time.monotonic() - t, time.process_time() - cpu
        pods = [k for k in keys if k[0] == "Pod"]
        assert len(pods) == PODS, len(pods)
        p = src.objects()[("Pod", "s7", "p7")]
        assert isinstance(p, model.Pod)
        assert p.labels == {"app": "app7", "tier": "db", "pod": "p7"} and p.node_name == "node7"
        assert [str(a) for a in p.ips] == [ip(7)] and p.named_port("dns", "UDP") == [53] and not p.host_network
        print(f"\nlist of {PODS} pods, {NAMESPACES} namespaces (pages of {kubeclient.PAGE}): {listed:.2f}s, "
              f"{cpu:.2f}s of this process's CPU")
        pm, host = kube.admin.rest_client.pool_manager, kube.admin.configuration.host
        t, token, fetch, decode, cpu = time.monotonic(), "", 0.0, 0.0, time.process_time()
        while True:  # the same pages, fetched and decoded only: what the API server and json.loads take of it
            r = pm.request("GET", f"{host}/api/v1/pods?limit={kubeclient.PAGE}&continue={token}", timeout=60)
            t1 = time.monotonic()
            meta = json.loads(r.data)["metadata"]
            fetch, decode, t = fetch + t1 - t, decode + time.monotonic() - t1, time.monotonic()
            token = meta.get("continue", "")
            if not token:
                break
        print(f"the same pages fetched alone: {fetch:.2f}s, their json.loads {decode:.2f}s; "
              f"{time.process_time() - cpu:.2f}s of this process's CPU")

        follow = Follower(src)
        gone = range(PODS - 500, PODS)
        try:
            # One change at a time: from the request (and from the API's answer) to the poll() that reports it.
            latency, after_answer = [], []
            for i in range(100):
                key = ("Pod", ns_of(i), f"p{i}")
                sent = time.monotonic()
                send(kube, [("PATCH", f"/api/v1/namespaces/{ns_of(i)}/pods/p{i}", {
                    "metadata": {"labels": {"tier": "moved"}}})])
                answered = time.monotonic()
                seen = follow.until({key}, sent, 30)
                latency.append(seen - sent)
                after_answer.append(max(0.0, seen - answered))  # the event can come before the answer is read
            print("one label change at a time, to the poll() that reports it: from the request p50 "
                  f"{pct(latency, 0.5) * 1000:.1f} ms, p95 {pct(latency, 0.95) * 1000:.1f} ms; from the API's answer "
                  f"p50 {pct(after_answer, 0.5) * 1000:.1f} ms, p95 {pct(after_answer, 0.95) * 1000:.1f} ms, "
                  f"max {max(after_answer) * 1000:.1f} ms")
            moved = src.objects()[("Pod", "s0", "p0")]
            assert isinstance(moved, model.Pod) and moved.labels["tier"] == "moved"

            # A burst: 2,000 pods relabelled and 500 deleted, as fast as the API takes them.
            burst = range(100, 2100)
            start = time.monotonic()
            send(kube, [("PATCH", f"/api/v1/namespaces/{ns_of(i)}/pods/p{i}", {
                "metadata": {"labels": {"tier": "burst"}}}) for i in burst]
                 + [("DELETE", f"/api/v1/namespaces/{ns_of(i)}/pods/p{i}?gracePeriodSeconds=0", None) for i in gone])
            sent = time.monotonic()
            want = {("Pod", ns_of(i), f"p{i}") for i in (*burst, *gone)}
            last = follow.until(want, start, 120)
            print(f"burst of {len(want)} changes: sent in {sent - start:.2f}s, the last reported "
                  f"{(last - sent) * 1000:.0f} ms after the last answer")
            assert all(src.objects()[("Pod", ns_of(i), f"p{i}")].labels["tier"] == "burst"  # type: ignore[union-attr]
                       for i in burst)
            assert not any(("Pod", ns_of(i), f"p{i}") in src.objects() for i in gone)
        finally:
            follow.close()
            make_pods(kube, gone)
    finally:
        stop.set()


@pytest.mark.slow
@pytest.mark.long
def test_what_the_source_holds_of_ten_thousand_pods(cluster_objects: KubeAPI) -> None:
    stop = threading.Event()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        src = source(cluster_objects, stop)
        src.poll()
        stop.set()
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(k[0] == "Pod" for k in src.objects()) == PODS
    mib = (held - base) / 2**20
    print(f"\nthe source holds {mib:.1f} MiB for {PODS} pods ({(held - base) / PODS:.0f} B a pod; "
          f"peak while listing {(peak - base) / 2**20:.1f} MiB), by tracemalloc")
    assert mib < 100


def policies(count: int) -> list[tuple[str, str, Any]]:
    """`count` NetworkPolicies over the NAMESPACES namespaces, of every kind upstream has: pod and namespace
    selectors, matchExpressions, named and numeric ports, endPort, ipBlock with except, egress."""
    out = []
    for j in range(count):
        kind = j % 4
        rule: dict[str, Any]
        if kind == 0:
            rule = {"from": [{"podSelector": {"matchLabels": {"app": f"app{j * 7 % 40}"}}}],
                    "ports": [{"port": 8080}, {"port": "http"}]}
        elif kind == 1:
            rule = {"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{j % 5}"}},
                              "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                                    "values": ["web", "db"]}]}}],
                    "ports": [{"port": 9000, "endPort": 9200, "protocol": "TCP"}]}
        elif kind == 2:
            rule = {"from": [{"ipBlock": {"cidr": "10.64.0.0/14", "except": [f"10.64.{j % 40}.0/24"]}}]}
        else:
            rule = {"from": [{"namespaceSelector": {}}], "ports": [{"port": "dns", "protocol": "UDP"}]}
        spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": f"app{j % 40}"}}, "ingress": [rule]}
        if j % 5 == 0:
            spec["egress"] = [{"to": [{"namespaceSelector": {"matchLabels": {"team": f"t{j % 5}"}}}],
                               "ports": [{"port": "http"}]}]
        out.append(("POST", f"/apis/networking.k8s.io/v1/namespaces/s{j % NAMESPACES}/networkpolicies",
                    {"metadata": {"name": f"pol{j}"}, "spec": spec}))
    return out


def rss_kib(root: int) -> tuple[int, str]:
    """The largest resident set among `root` and its descendants (weftd, under the wrappers that start it)."""
    best = (0, "")
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
            children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        except OSError:
            continue
        rss = int(status.get("VmRSS", "0 kB").split()[0])
        best = max(best, (rss, status["Name"].strip()))
        todo += [int(c) for c in children]
    return best


@pytest.mark.slow
@pytest.mark.long
def test_weftd_rss_with_ten_thousand_pods_and_a_thousand_policies(cluster_objects: KubeAPI,
                                                                  kube_cluster: Cluster) -> None:  # noqa: F811
    """weftd with --policy-kube, as the DaemonSet runs it, on the node of 100 of the 10,000 pods."""
    kube, c = cluster_objects, kube_cluster
    send(kube, policies(1000))
    try:
        t = time.monotonic()
        cn = join(kube, c, "node1", "10.244.1.0/24")
        c.until(lambda: cn.metric("weft_policies") == 1000, 600, "1,000 policies applied", cn)
        took = time.monotonic() - t
        assert cn.proc is not None
        rss, name = rss_kib(cn.proc.pid)
        print(f"\nweftd ({name}) with {PODS} pods, 1000 policies: first apply {took:.1f}s after start, "
              f"RSS {rss / 1024:.0f} MiB")
        assert rss < 300 * 1024
    finally:
        send(kube, [("DELETE", f"/apis/networking.k8s.io/v1/namespaces/s{j % NAMESPACES}/networkpolicies/pol{j}",
                     None) for j in range(1000)])
