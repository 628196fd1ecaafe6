"""Dataplane benchmark: pod-to-pod TCP throughput against node-to-node over the same underlay.

Two simulated nodes (tests/cluster.py): each node's eth0 is a veth to a bridge in an underlay
namespace. Node-to-node is iperf3 from node 1's address to node 2's over that underlay; pod-to-pod is
iperf3 from a pod on node 1 to a pod on node 2, over the same underlay (vxlan: encapsulated; host-gw:
routed). Both run in the same cluster, alternately, `WEFT_BENCH_TPUT_ROUNDS` times; each round gives a
ratio, and the figures are medians with [min-max]. The load average (1 min) before and after each
backend's rounds is printed with its figures: on 2 shared cores they mean little without it.

Besides Gbit/s, each transfer gives the CPU seconds both iperf3 processes used per GB moved (user +
system, which holds the kernel's softirq work done on their behalf: the whole path, every hop). On two
cores shared with other work, throughput is largely a scheduling draw; the CPU cost per GB is not, and
node/pod of it is the ratio the path itself allows.

Run with `make bench` (or `python -m bench.dataplane_bench [vxlan host-gw wireguard]`;
WEFT_BENCH_THROUGHPUT=0 skips it). Nothing here has a pass mark.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cluster import Cluster, ClusterNode
from tests.lab import Lab, Netns

ROUNDS = int(os.environ.get("WEFT_BENCH_TPUT_ROUNDS", "7"))
SECONDS = int(os.environ.get("WEFT_BENCH_TPUT_SECONDS", "4"))
BACKENDS = ("vxlan", "host-gw", "wireguard")
# iperf3 runs at a higher CPU priority than whatever else the machine runs, both ends and both paths
# alike: otherwise on 2 shared cores a figure says more about the neighbours than about the path.
NICE = ("nice", "-n", "-10")


@dataclass
class Transfer:
    gbps: float
    cpu_s_per_gb: float


@contextmanager
def iperf_server(server: Netns, server_ip: str) -> Iterator[None]:
    """An iperf3 server for one test (-1) on `server_ip` in `server`; killed after."""
    srv = subprocess.Popen(["ip", "netns", "exec", server.name, *NICE, "iperf3", "-s", "-1", "-B", server_ip],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        srv.kill()
        srv.wait()


@contextmanager
def pod_pair(backend: str) -> Iterator[tuple[ClusterNode, ClusterNode, Netns, Netns, str]]:
    """Two simulated nodes on `backend` with a pod on each: (node 1, node 2, pod a on node 1, pod b on
    node 2, b's address); all removed after."""
    lab = Lab(Path(tempfile.mkdtemp(prefix="weft-bench-")))
    c = Cluster(lab, {"Network": "10.244.0.0/16", "Backend": {"Type": backend}})
    try:
        n1, n2 = c.boot(["n1", "n2"])
        a, _ = c.pod(n1, "a")
        b, b_ip = c.pod(n2, "b")
        yield n1, n2, a, b, b_ip
    finally:
        c.close()
        lab.close()


def iperf_run(client: Netns, server: Netns, server_ip: str, seconds: int = SECONDS) -> Transfer:
    """One iperf3 TCP transfer from `client` to `server_ip` in `server`."""
    with iperf_server(server, server_ip):
        for _ in range(50):  # until the server listens
            p = client.run(*NICE, "iperf3", "-c", server_ip, "-t", str(seconds), "-J", check=False)
            end = json.loads(p.stdout or "{}").get("end", {}) if p.returncode == 0 else {}
            received = end.get("sum_received")
            if received:
                cpu = end["cpu_utilization_percent"]
                cpu_s = (cpu["host_total"] + cpu["remote_total"]) / 100 * received["seconds"]
                return Transfer(received["bits_per_second"] / 1e9, cpu_s / (received["bytes"] / 1e9))
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 to {server_ip} failed: {p.stdout[-300:]}")


def iperf(client: Netns, server: Netns, server_ip: str, seconds: int = 5) -> float:
    """Gbit/s of one iperf3 TCP transfer."""
    return iperf_run(client, server, server_ip, seconds).gbps


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):5.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def throughput(backend: str, rounds: int = ROUNDS) -> dict[str, Any]:
    load_before = load()
    with pod_pair(backend) as (n1, n2, a, b, b_ip):
        node: list[Transfer] = []
        pod: list[Transfer] = []
        for i in range(rounds):
            runs = [(node, n1.ns, n2.ns, n2.ip), (pod, a, b, b_ip)]
            for out, client, server, ip in runs if i % 2 == 0 else runs[::-1]:
                out.append(iperf_run(client, server, ip))
        med = statistics.median
        ratios = [p.gbps / n.gbps for n, p in zip(node, pod, strict=True)]
        cpu_node, cpu_pod = med([t.cpu_s_per_gb for t in node]), med([t.cpu_s_per_gb for t in pod])
        load_after = load()
        print(f"  {backend:9} Gbit/s node-to-node {spread([t.gbps for t in node])}, "
              f"pod-to-pod {spread([t.gbps for t in pod])}; ratio pod/node {spread(ratios)}; "
              f"load average {load_before:.2f} before, {load_after:.2f} after", flush=True)
        print(f"  {backend:9} CPU s per GB: node-to-node {cpu_node:.3f}, pod-to-pod {cpu_pod:.3f}; "
              f"ratio node/pod {cpu_node / cpu_pod:.2f}", flush=True)
        return {"rounds": rounds, "seconds": SECONDS,
                "node_gbps": round(med([t.gbps for t in node]), 2), "pod_gbps": round(med([t.gbps for t in pod]), 2),
                "ratio": round(med(ratios), 3), "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
                "node_cpu_s_per_gb": round(cpu_node, 3), "pod_cpu_s_per_gb": round(cpu_pod, 3),
                "cpu_ratio": round(cpu_node / cpu_pod, 3), "load_before": load_before, "load_after": load_after}


def main(backends: list[str]) -> int:
    if os.environ.get("WEFT_BENCH_THROUGHPUT", "1") == "0":
        print("throughput: skipped (WEFT_BENCH_THROUGHPUT=0)")
        return 0
    backends = backends or list(BACKENDS)
    print(f"throughput: iperf3 TCP, {SECONDS} s per transfer, pod on node 1 to pod on node 2 against node 1 to "
          f"node 2 over the same underlay; {ROUNDS} alternating rounds; median [min-max]")
    if "wireguard" in backends:
        print("  (wireguard runs in userspace here, wireguard-go: no kernel module; not a proxy for kernel "
              "WireGuard; 3 rounds)")
    out = {backend: throughput(backend, ROUNDS if backend != "wireguard" else 3) for backend in backends}
    if "wireguard" in out and "vxlan" in out:
        print(f"  wireguard/vxlan pod-to-pod ratio {out['wireguard']['pod_gbps'] / out['vxlan']['pod_gbps']:.2f}")
    print(json.dumps({"dataplane_bench": out}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
