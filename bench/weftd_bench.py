"""weftd benchmarks: convergence to N peers, memory at 5,000 peers (throughput: bench/dataplane_bench.py).

Run with `make bench`. Each figure is measured in namespaces of its own; nothing here has a pass mark.
WEFT_BENCH_SIZES (100,1000,5000) and WEFT_BENCH_BACKENDS (vxlan,host-gw,wireguard) narrow the
convergence runs; WEFT_BENCH_STORE=etcd has the peers appear in a real etcd (in transactions of 128
keys, etcd's limit) instead of the shared file.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netaddr

from tests.cluster import ETCD_IP, Cluster
from tests.lab import Lab, proc_kib
from weftd.lease import Lease
from weftd.subnet.etcd import DEFAULT_PREFIX, subnet_key

SIZES = tuple(int(n) for n in os.environ.get("WEFT_BENCH_SIZES", "100,1000,5000").split(","))
BACKENDS = tuple(os.environ.get("WEFT_BENCH_BACKENDS", "vxlan,host-gw,wireguard").split(","))
CHURN = 500
STORE = os.environ.get("WEFT_BENCH_STORE", "file")
# Runs in etcd's namespace: connects, says so, then applies one line of {"put": {key: value}, "delete": [key]}.
ETCD_WRITER = """
import base64, json, sys
from etcd3gw.client import Etcd3Client
c = Etcd3Client(host=sys.argv[1], port=2379)
c.status()
print("ready", flush=True)
ops = json.loads(sys.stdin.readline())
b64 = lambda s: base64.b64encode(s.encode()).decode()
reqs = [{"request_delete_range": {"key": b64(k)}} for k in ops["delete"]]
reqs += [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in ops["put"].items()]
for i in range(0, len(reqs), 128):
    c.transaction({"compare": [], "success": reqs[i:i + 128], "failure": []})
print("done", flush=True)
"""


def fake_peers(n: int, backend: str = "vxlan") -> dict[str, Any]:
    """N peers as another node would publish them: subnet, underlay address, VTEP MAC or WireGuard key."""
    out = {}
    subnets = netaddr.IPNetwork("10.0.0.0/8").subnet(24)
    next(subnets)
    next(subnets)  # the benchmarked node's own
    for i in range(n):
        subnet = next(subnets)
        ip = netaddr.IPAddress(int(netaddr.IPAddress("192.168.100.0")) + i)
        mac = f"02:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:01"
        data: dict[str, Any] = {"VNI": 1, "VtepMAC": mac}
        if backend == "wireguard":
            data = {"PublicKey": base64.b64encode(os.urandom(32)).decode(), "Port": 51820}  # any 32 bytes do
        out[f"peer{i}"] = {"Node": f"peer{i}", "Subnet": str(subnet), "PublicIP": str(ip), "BackendType": backend,
                           "BackendData": data}
    return out


def publisher(c: Cluster, put: dict[str, Any], gone: dict[str, Any]) -> Callable[[], None]:
    """Prepares a change of the store: the leases `put` appear, those `gone` go (both by node). The callable
    makes it, at once (file: one rename) or as fast as etcd takes it (a transaction per 128 keys)."""
    if STORE == "file":
        store = c.dir / "store.json"
        data = json.loads(store.read_text())
        data["leases"].update(put)
        for name in gone:
            del data["leases"][name]
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        return lambda: os.replace(tmp, store)
    assert c.etcd_ns is not None

    def key(lease: dict[str, Any]) -> str:
        return subnet_key(DEFAULT_PREFIX, Lease.from_json(lease))
    ops = {"put": {key(le): json.dumps(le) for le in put.values()}, "delete": [key(le) for le in gone.values()]}
    writer = subprocess.Popen(["ip", "netns", "exec", c.etcd_ns.name, sys.executable, "-c", ETCD_WRITER, ETCD_IP],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None and writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"

    def write() -> None:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write(json.dumps(ops) + "\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "done"
        writer.wait(60)
    return write


def convergence(backend: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in SIZES:
        lab = Lab(Path(tempfile.mkdtemp(prefix="weft-bench-")))
        c = Cluster(lab, {"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": backend}}, store=STORE)
        try:
            if STORE == "etcd":
                c.start_etcd()
            cn = c.add_node("n1")
            cn.ns.run("ip", "addr", "add", "192.168.200.254/16", "dev", "eth0")  # peers' underlay is on-link
            c.start(cn)
            c.wait_ready(cn)
            peers = fake_peers(n, backend)
            write = publisher(c, peers, {})
            assert cn.proc is not None
            cpu0 = cpu_seconds(cn.proc.pid)
            t0 = time.perf_counter()
            write()
            # wireguard: one route covers the network; the peers are on the device.
            done = f"weft_wireguard_peers {float(n)}" if backend == "wireguard" else f"weft_routes {float(n)}"
            c.until(lambda cn=cn, done=done: done in cn.http("/metrics")[1], 600, f"{n} peers", cn)
            took = time.perf_counter() - t0
            cpu = round(cpu_seconds(cn.proc.pid) - cpu0, 2)
            routes = len(cn.routes())
            rss = round(proc_kib(cn.proc.pid) / 1024, 1)
            results[str(n)] = {"seconds": round(took, 3), "routes": routes, "rss_mib": rss, "weftd_cpu_s": cpu}
            print(f"  {backend:9} N={n:5}: all peers programmed in {took:7.2f} s ({routes} routes), "
                  f"weftd CPU {cpu:.2f} s, RSS {results[str(n)]['rss_mib']} MiB", flush=True)
            if n == max(SIZES) and backend != "wireguard":
                results[f"churn_{n}"] = churn(c, cn, peers, n, backend)
        finally:
            c.close()
            lab.close()
    return results


def churn(c: Cluster, cn: Any, peers: dict[str, Any], n: int, backend: str, moved: int = CHURN) -> dict[str, Any]:
    """`moved` of the N peers leave and as many others join, in one store update: seconds until the
    node's routes are exactly the new set (routes are the last step of a round, after neighbours and FDB)."""
    gone = {f"peer{i}": peers[f"peer{i}"] for i in range(moved)}
    newcomers = fake_peers(n + moved, backend)
    joined = {f"peer{i}": newcomers[f"peer{i}"] for i in range(n, n + moved)}
    want = {lease["Subnet"] for name, lease in {**peers, **joined}.items() if name not in gone}
    write = publisher(c, joined, gone)
    # Polling `ip route` for 5,000 routes would load the machine more than weftd does: wait for weftd's
    # count of kernel changes (each counted once the kernel acknowledged it), then check the kernel.
    per_peer = 3 if backend == "vxlan" else 1  # route, and for vxlan its neighbour and FDB entry
    target = changes(cn) + 2 * moved * per_peer
    assert cn.proc is not None
    cpu0 = cpu_seconds(cn.proc.pid)
    t0 = time.perf_counter()
    write()
    c.until(lambda: changes(cn) >= target, 600, f"{moved} peers replaced", cn)
    took = time.perf_counter() - t0
    cpu = round(cpu_seconds(cn.proc.pid) - cpu0, 2)
    c.until(lambda: {r["dst"] for r in cn.routes()} == want, 10, "the kernel's routes are the new set", cn)
    peak = round(proc_kib(cn.proc.pid, "VmHWM") / 1024, 1)
    print(f"  {backend:9} N={n:5}: {moved} leave and {moved} join at once, kernel matches in {took:7.2f} s, "
          f"weftd CPU {cpu:.2f} s, peak RSS {peak} MiB", flush=True)
    return {"seconds": round(took, 3), "weftd_cpu_s": cpu, "peak_rss_mib": peak}


def changes(cn: Any) -> float:
    for line in cn.http("/metrics")[1].splitlines():
        if line.startswith("weft_kernel_changes_total "):
            return float(line.split()[1])
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used: what the work cost, whatever else loads the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    out: dict[str, Any] = {"convergence": {}}
    print(f"convergence: one node, N peers appear in the store at once; at N={max(SIZES)}, then {CHURN} of them "
          f"leave and as many join (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    for backend in BACKENDS:
        out["convergence"][backend] = convergence(backend)
    if "vxlan" in BACKENDS:
        out[f"weftd_rss_mib_at_{max(SIZES)}"] = out["convergence"]["vxlan"][str(max(SIZES))]["rss_mib"]
    print(json.dumps({"weftd_bench": out}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
