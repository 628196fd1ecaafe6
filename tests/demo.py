"""`make demo`: pods on a simulated node, attached by weft through libcni, talking to each other.

Everything lives in network namespaces this script creates and deletes, even on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.lab import Lab, weft_conf

PODS = 3


def main() -> int:
    lab = Lab(Path(tempfile.mkdtemp(prefix="weft-demo-")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        node = lab.node("node")
        conflist = node.write_conflist("weftnet", [weft_conf(data_dir=node.data_dir, ipMasq=True)])
        print(f"node {node.ns.name}: conflist {json.dumps(json.loads(conflist.read_text()))}")
        pods, ips = [], []
        for i in range(PODS):
            pod = node.pod(f"pod{i}")
            t = time.perf_counter()
            res = node.drive("add", conflist, f"demo{i}", pod.path).json
            ms = (time.perf_counter() - t) * 1000
            ip = res["ips"][0]["address"].split("/")[0]
            pods.append(pod)
            ips.append(ip)
            print(f"  ADD demo{i}: {ip} on {res['interfaces'][1]['name']} ({ms:.0f} ms through libcni)")
        ok = total = 0
        print("ping matrix (pod -> pod / gateway):")
        for i, pod in enumerate(pods):
            row = []
            for target in [*ips, "10.22.0.1"]:
                total += 1
                good = pod.run("ping", "-c1", "-W2", target, check=False).returncode == 0
                ok += good
                row.append("ok " if good else "XX ")
            print(f"  pod{i} {ips[i]:>12}: {' '.join(row)}")
        for i, pod in enumerate(pods):
            node.drive("check", conflist, f"demo{i}", pod.path)
            node.drive("del", conflist, f"demo{i}", pod.path)
        leftovers = [n for n in node.ns.links() if n.startswith("weft")] + list(node.leases("weftnet"))
        print(f"summary: {PODS} pods, {ok}/{total} pings answered, CHECK passed, "
              f"after DEL {len(leftovers)} links/leases left")
        return 0 if ok == total and not leftovers else 1
    finally:
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
