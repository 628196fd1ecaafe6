"""`make demo`: three simulated nodes running weftd (vxlan, embedded file store), two pods on each,
attached by `weft` through libcni with the conflist weftd wrote, all pinging each other across nodes.

Everything lives in network namespaces this script creates and deletes, even on failure or Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster import Cluster
from tests.lab import Lab

PODS_PER_NODE = 2


def main() -> int:
    backend = sys.argv[1] if len(sys.argv) > 1 else "vxlan"
    lab = Lab(Path(tempfile.mkdtemp(prefix="weft-demo-")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    cluster = None
    try:
        cluster = Cluster(lab, {"Network": "10.244.0.0/16", "Backend": {"Type": backend}})
        t = time.perf_counter()
        nodes = cluster.boot(["node1", "node2", "node3"])
        print(f"3 nodes up with weftd ({backend}, file store) in {time.perf_counter() - t:.1f}s")
        for cn in nodes:
            st = cn.state()
            routes = ", ".join(f"{r['dst']} via {r.get('gateway')} dev {r['dev']}" for r in cn.routes())
            print(f"  {cn.name} {cn.ip}: subnet {st['WEFT_SUBNET']}, MTU {st['WEFT_MTU']}; routes: {routes}")
        pods = []
        for cn in nodes:
            for i in range(PODS_PER_NODE):
                t = time.perf_counter()
                ns, ip = cluster.pod(cn, f"{cn.name}-pod{i}")
                pods.append((f"{cn.name}-pod{i}", ns, ip))
                print(f"  ADD {cn.name}-pod{i}: {ip} ({(time.perf_counter() - t) * 1000:.0f} ms through libcni)")
        print("ping matrix (every pod to every pod):")
        ok = total = 0
        for name, ns, _ in pods:
            row = []
            for _, _, ip in pods:
                good = ns.run("ping", "-c1", "-W2", ip, check=False).returncode == 0
                ok += good
                total += 1
                row.append("ok" if good else "XX")
            print(f"  {name:>12}: {' '.join(row)}")
        cross = sum(1 for a in pods for b in pods if a[0].split("-")[0] != b[0].split("-")[0])
        print(f"summary: {len(nodes)} nodes, {len(pods)} pods, {ok}/{total} pings answered "
              f"({cross} of them across nodes, over {backend})")
        return 0 if ok == total else 1
    finally:
        if cluster is not None:
            cluster.close()
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
