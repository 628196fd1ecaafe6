"""What deleting a pod's veth costs the kernel, by how long ago another pod's network namespace was
deleted: the reason plugin_bench deletes its pods' namespaces only after their DELs.

A deleted namespace is torn down by the kernel in the background (cleanup_net), and an RTM_DELLINK
that runs meanwhile waits longer. In a node namespace of its own, Weft's ADD (in-process, as weftd
runs it) attaches a pod; another pod's namespace is deleted; after a given gap the first pod's host
veth is deleted with one RTM_DELLINK, timed alone. Gaps alternate round by round. Run with
`python -m bench.veth_delete [rounds]`; a benchmark, no pass marks.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cni_plugin.plugin import HANDLERS, PLUGIN
from tests.lab import Lab
from weftlib.cni import skel
from weftlib.kernel.netlink import host_veth_name
from weftlib.kernel.netns import NetNS
from weftlib.kernel.rtnl import Rtnl

GAPS = (0.0, 0.015, 0.05, 0.2, None)  # None: no namespace deleted before


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    lab = Lab(Path(tempfile.mkdtemp(prefix="weft-bench-")))
    try:
        node = lab.node("node")
        conf = json.dumps({"cniVersion": "1.0.0", "name": "del", "type": "weft", "bridge": "cni0", "isGateway": True,
                           "ipam": {"type": "weft-ipam", "subnet": "10.79.0.0/24", "dataDir": str(node.data_dir)}})
        took: dict[float | None, list[float]] = {gap: [] for gap in GAPS}

        def invoke(command: str, cid: str, netns: str) -> None:
            env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
                   "CNI_PATH": str(node.bin), "CNI_ARGS": ""}
            out = skel.invoke(PLUGIN, HANDLERS, conf.encode(), env, None)
            if out.status != 0:
                raise RuntimeError(out.stdout)

        def drop(ns_name: str) -> None:
            subprocess.run(["ip", "netns", "del", ns_name], check=True)
            lab.namespaces.remove(next(n for n in lab.namespaces if n.name == ns_name))

        with NetNS(node.ns.path) as handle, handle.entered(), Rtnl() as rt:
            for r in range(rounds):
                for gap in GAPS:
                    other, pod = lab.netns("o"), lab.netns("p")
                    cid = f"c{r}-{gap}"
                    invoke("ADD", cid, pod.path)
                    time.sleep(0.3)  # what earlier rounds left the kernel doing is done
                    if gap is not None:
                        drop(other.name)
                        time.sleep(gap)
                    link = rt.link(host_veth_name(cid, "eth0"))
                    assert link is not None
                    t = time.perf_counter()
                    rt.del_link(link.index)
                    took[gap].append((time.perf_counter() - t) * 1000)
                    invoke("DEL", cid, pod.path)
                    drop(pod.name)
                    if gap is None:
                        drop(other.name)
        print(f"veth delete, by the time since another namespace was deleted, {rounds} rounds (ms):")
        for gap, xs in took.items():
            label = "none deleted" if gap is None else f"{gap * 1000:.0f} ms after"
            print(f"  {label:>14}: p50 {statistics.median(xs):5.1f}  mean {statistics.mean(xs):5.1f}  "
                  f"min {min(xs):5.1f}  max {max(xs):5.1f}")
        p50 = {str(gap): round(statistics.median(xs), 2) for gap, xs in took.items()}
        print(json.dumps({"veth_delete_p50_ms": p50}))
    finally:
        lab.close()


if __name__ == "__main__":
    main()
