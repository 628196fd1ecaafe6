"""Pod start latency on a real Kubernetes cluster (tests/k8s): from the create call to Running, Weft against
the reference `bridge` + `host-local` plugins, in one run.

One two-node cluster is booted without a CNI, then:
1. reference: a conflist of Debian's reference plugins (/usr/lib/cni: bridge with host-local on the node's
   podCIDR, chained with portmap, as Weft's conflist chains it) on every node; PODS_ONE pods on the worker;
2. the reference conflists, bridges and reservations removed, Weft installed as users install it
   (`kubectl apply -f conf/kube-weft.yml`); PODS_ONE pods on the worker;
3. Weft: PODS_SPREAD pods spread across both nodes (pinned alternately).
Each phase creates its pods one after the other (busybox `sleep`) and waits until all run; the one-node phases
then delete them and wait until kubelet has torn them down (the last phase leaves its pods to `down`). The
worker runs no control-plane process, so the one-node phases differ only in the CNI.

Two measures per pod:
- watch: from just before the bench's create call to the first watch event showing the pod Running and Ready,
  on the bench's clock; it includes kubelet's status report, which kubelet's default client rate
  (kubeAPIQPS 5) spaces out when many pods start at once;
- api: the pod's creationTimestamp to its container's startedAt, both from the API (whole seconds).

    python -m bench.pod_start_bench [--pods-one 50] [--pods-spread 100]

This is a benchmark, not a test: nothing here has a pass mark.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from bench.plugin_bench import percentile
from tests.k8s.cluster import Cluster
from tests.k8s.layout import KUBE_BIN, image_selection, missing_binaries
from tests.k8s.node import REFERENCE_CNI

CONTROL, WORKER = "weft-control-plane", "weft-worker"
IMAGE = "docker.io/library/busybox:1.29"
NAMESPACE = "default"
REF_NETWORK = "ref"
REF_BRIDGE = "refbr0"
REF_CONFLIST = "/etc/cni/net.d/10-ref.conflist"
TIMEOUT = 600.0


@dataclass(frozen=True)
class Phase:
    name: str
    nodes: tuple[str, ...]
    pods: int


@dataclass
class Measured:
    phase: Phase
    watch: list[float]
    api: list[float]
    wall: float  # first create to last pod Running

    def row(self) -> dict[str, Any]:
        return {"pods": self.phase.pods, "nodes": len(self.phase.nodes), "wall_s": round(self.wall, 2),
                **{f"{k}_p{q}": round(percentile(xs, q / 100), 3)
                   for k, xs in (("watch", self.watch), ("api", self.api)) for q in (50, 95)}}


def reference_conflist(subnet: str) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": REF_NETWORK, "plugins": [
        {"type": "bridge", "bridge": REF_BRIDGE, "isGateway": True, "isDefaultGateway": True, "hairpinMode": True,
         "forceAddress": True, "ipam": {"type": "host-local", "subnet": subnet, "dataDir": "/var/lib/cni/networks"}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}


def install_reference(cluster: Cluster, core: client.CoreV1Api) -> None:
    for n in core.list_node().items:
        conf = json.dumps(reference_conflist(n.spec.pod_cidr))
        cluster.node(n.metadata.name).run(
            "sh", "-c", f"cp {REFERENCE_CNI}/bridge {REFERENCE_CNI}/host-local /opt/cni/bin/ && "
                        f"echo {shlex.quote(conf)} > {REF_CONFLIST}")
    cluster.until(cluster.all_ready, 180, "every node Ready with the reference conflist")


def remove_reference(cluster: Cluster, core: client.CoreV1Api) -> None:
    for n in core.list_node().items:
        cluster.node(n.metadata.name).run(
            "sh", "-c", f"rm -f {REF_CONFLIST} && rm -rf /var/lib/cni/networks/{REF_NETWORK} && "
                        f"if ip link show {REF_BRIDGE} >/dev/null 2>&1; then ip link del {REF_BRIDGE}; fi")


def pod(name: str, node: str) -> dict[str, Any]:
    # A grace period of 1 s: deleting the pod then waits for kubelet to tear it down (0 would delete it at once).
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"bench": "pod-start"}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": IMAGE, "command": ["sleep", "36000"]}]}}


def running(p: Any) -> bool:
    return bool(p.status.phase == "Running" and any(c.type == "Ready" and c.status == "True"
                                                    for c in p.status.conditions or []))


def measure(core: client.CoreV1Api, phase: Phase, clean: bool = True) -> Measured:
    """Creates the phase's pods, waits until all run, and (`clean`) deletes them and waits until they are gone."""
    names = [f"{phase.name}-{i}" for i in range(phase.pods)]
    created: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()
    rv = core.list_namespaced_pod(NAMESPACE).metadata.resource_version
    w = watch.Watch()

    def follow() -> None:
        for event in w.stream(core.list_namespaced_pod, NAMESPACE, resource_version=rv,
                              label_selector="bench=pod-start", timeout_seconds=int(TIMEOUT)):
            p = event["object"]
            if p.metadata.name in names and p.metadata.name not in seen and running(p):
                seen[p.metadata.name] = time.monotonic()
                if len(seen) == len(names):
                    break
        done.set()

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    time.sleep(0.5)  # the watch is open before the first create
    for i, name in enumerate(names):
        created[name] = time.monotonic()
        core.create_namespaced_pod(NAMESPACE, pod(name, phase.nodes[i % len(phase.nodes)]))
    if not done.wait(TIMEOUT) or len(seen) < len(names):
        w.stop()
        raise RuntimeError(f"{phase.name}: {len(seen)} of {len(names)} pods Running within {TIMEOUT:.0f}s")
    api = []
    for p in core.list_namespaced_pod(NAMESPACE, label_selector="bench=pod-start").items:
        started: datetime = p.status.container_statuses[0].state.running.started_at
        api.append((started - p.metadata.creation_timestamp).total_seconds())
    measured = Measured(phase, [seen[n] - created[n] for n in names], api, max(seen.values()) - min(created.values()))
    if not clean:
        return measured
    core.delete_collection_namespaced_pod(NAMESPACE, label_selector="bench=pod-start")
    deadline = time.monotonic() + TIMEOUT
    while core.list_namespaced_pod(NAMESPACE, label_selector="bench=pod-start").items:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{phase.name}: pods still there {TIMEOUT:.0f}s after their deletion")
        time.sleep(1)
    return measured


def table(results: list[Measured]) -> dict[str, Any]:
    out = {m.phase.name: m.row() for m in results}
    print("\npod start latency, create -> Running, seconds (watch: the bench's clock; api: whole seconds)")
    print(f"{'variant':34} {'pods':>5} {'watch p50':>10} {'p95':>7} {'api p50':>8} {'p95':>5} {'all running':>12}")
    for m in results:
        r = out[m.phase.name]
        print(f"{m.phase.name:34} {r['pods']:5} {r['watch_p50']:10.2f} {r['watch_p95']:7.2f} {r['api_p50']:8.1f} "
              f"{r['api_p95']:5.1f} {r['wall_s']:11.1f}s")
    ref, weft = out.get("reference-one-node"), out.get("weft-one-node")
    if ref and weft:
        ratios = {k: round(weft[k] / ref[k], 2) if ref[k] else None
                  for k in ("watch_p50", "watch_p95", "api_p50", "api_p95", "wall_s")}
        out["ratio_weft_reference_one_node"] = ratios
        print("ratio weft/reference, one node: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pod_start_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods-one", type=int, default=50, help="pods of each one-node phase (default: %(default)s)")
    parser.add_argument("--pods-spread", type=int, default=100,
                        help="pods spread over both nodes (default: %(default)s)")
    args = parser.parse_args()
    missing = missing_binaries()
    if missing:
        print(f"no {', '.join(missing)} in {KUBE_BIN}: run `make kube kubectl image test-images`", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="weft-podstart-"))
    cluster = Cluster(directory, image_selection(directory / "images"))
    results: list[Measured] = []
    try:
        cluster.up(2, weft=False)
        core = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.layout.kubeconfig)))
        install_reference(cluster, core)
        phases = [Phase("reference-one-node", (WORKER,), args.pods_one)]
        cluster.say(f"reference bridge + host-local: {args.pods_one} pods on {WORKER}")
        results.append(measure(core, phases[0]))
        cluster.say(f"{phases[0].name}: {results[-1].row()}")
        remove_reference(cluster, core)
        cluster.install_weft()
        for phase in (Phase("weft-one-node", (WORKER,), args.pods_one),
                      Phase("weft-two-nodes", (CONTROL, WORKER), args.pods_spread)):
            cluster.say(f"weft: {phase.pods} pods on {', '.join(phase.nodes)}")
            results.append(measure(core, phase, clean=phase.nodes == (WORKER,)))
            cluster.say(f"{phase.name}: {results[-1].row()}")
    finally:
        cluster.down()
    print(json.dumps({"pod_start_bench": table(results)}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
