"""Pod set-up and tear-down: Weft against Debian's reference Go plugins, side by side.

Every variant gets a node namespace of its own with two networks, "plain" (bridge + IPAM) and
"masq" (the same with ipMasq, chained with the reference portmap), on the same subnets. The
operations run through `cnidrive` (libcni, as containerd does), interleaved: one round is ADD and
CHECK of a fresh pod on every variant in turn, then, after POD_AGE, their DELs in the same order, and
only then are the pods' namespaces deleted; each round starts at another variant, so drift on the
machine hits all alike.

Weft runs from the frozen bundle (`make build`) on two paths: the production path, where the `weft`
shim hands each invocation to a frozen weftd on the node, and the standalone path, with no weftd, where
the shim execs the Python plugin (`weft-py`) for every invocation. WEFT_BENCH_SOURCE=1 adds the same
two with the source tree (the shim in front of the venv's scripts and `python -m weftd`).

Run with `make bench`. This is a benchmark, not a test: nothing here has a pass mark.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab import (
    REFERENCE_DIR,
    ROOT,
    SOCKET_DIR,
    Lab,
    Netns,
    Node,
    cnidrive_path,
    file_store,
    install_bundle,
    proc_kib,
    weftd_command,
    weftd_exe,
    weftd_pid,
)
from weftlib.kernel.netns import NetNS

ROUNDS = int(os.environ.get("WEFT_BENCH_ROUNDS", "30"))
BURST = int(os.environ.get("WEFT_BENCH_BURST", "100"))
POD_AGE = 0.2  # seconds between a round's last CHECK and its first DEL
SOURCE = os.environ.get("WEFT_BENCH_SOURCE", "") == "1"
PRODUCTION, STANDALONE = "weft-frozen+weftd", "weft-frozen"
BUNDLE = Path(os.environ.get("WEFT_BUNDLE", ROOT / ".build" / "dist" / "weft"))
NETWORKS = {"plain": ("cni0", "10.77.0.0/24"), "masq": ("cni1", "10.78.0.0/24")}


@dataclass
class Variant:
    name: str
    node: Node
    weft: str | None  # None: the reference plugins; else "frozen" or "source"
    weftd: subprocess.Popen[bytes] | None = None
    socket: Path | None = None
    times: dict[str, list[float]] = field(default_factory=dict)

    def conflist(self, network: str) -> Path:
        bridge, subnet = NETWORKS[network]
        data = str(self.node.dir / "ipam")
        if self.weft is None:
            main: dict[str, Any] = {"type": "bridge", "ipam": {"type": "host-local", "subnet": subnet,
                                                                "dataDir": data}}
        else:
            main = {"type": "weft", "ipam": {"type": "weft-ipam", "subnet": subnet, "dataDir": data}}
            if self.socket is not None:
                main["daemonSocket"] = str(self.socket)
        main.update({"bridge": bridge, "isGateway": True, "ipMasq": network == "masq"})
        plugins = [main] + ([{"type": "portmap", "capabilities": {"portMappings": True}}] if network == "masq" else [])
        return self.node.write_conflist(f"bench-{network}", plugins)


Completed = subprocess.CompletedProcess[str]


def drive(v: Variant, verb: str, conflist: Path, cid: str, netns: str, **env: str) -> tuple[float, Completed]:
    """One libcni operation from inside the node's namespace; returns its wall time in ms. `env`: more of
    cnidrive's environment (CNIDRIVE_ARGS)."""
    with NetNS(v.node.ns.path).entered():  # this thread only; the child inherits it
        t = time.perf_counter()
        p = subprocess.run([cnidrive_path(), verb, str(conflist), cid, netns, "eth0"], capture_output=True, text=True,
                           env=v.node.env(**env))
        took = (time.perf_counter() - t) * 1000
    if p.returncode != 0:
        raise RuntimeError(f"{v.name} {verb} {cid}: {p.stdout}{p.stderr}")
    return took, p


def start_weftd(lab: Lab, v: Variant, extra: tuple[str, ...] = (), underlay: tuple[Netns, str] | None = None) -> None:
    """weftd on the variant's node, named after the variant, with `extra` arguments; returns once it wrote
    its conflist (weftd-net.d/10-weft.conflist in the node's directory). `underlay`: a namespace with a
    bridge br0 to plug the node's eth0 into, and the node's address there (by default its eth0 leads to a
    namespace of its own, at 192.168.91.1/24)."""
    ns = v.node.ns
    if underlay is None:
        peer, address, port = lab.netns("underlay"), "192.168.91.1/24", "eth0"
    else:
        (peer, address), port = underlay, f"{lab.tag}{v.name}"[:15]
    ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", peer.name)
    if underlay is not None:
        peer.run("ip", "link", "set", port, "master", "br0", "up")
    ns.run("ip", "addr", "add", address, "dev", "eth0")
    ns.run("ip", "link", "set", "eth0", "up")
    (v.node.dir / "net-conf.json").write_text(json.dumps({"Network": "10.90.0.0/16",
                                                          "Backend": {"Type": "host-gw"}}))
    v.socket = SOCKET_DIR / f"{lab.tag}-{v.name}.sock"
    exe = weftd_exe(BUNDLE if v.weft == "frozen" else None)
    v.weftd = subprocess.Popen(
        weftd_command(ns, exe, v.name, file_store(v.node.dir / "store.json"), v.node.dir / "net-conf.json",
                      v.node.dir / "subnet.env", v.node.dir / "weftd-net.d", v.socket, v.node.dir / "ipam",
                      extra=extra),
        stdout=subprocess.DEVNULL, stderr=open(v.node.dir / "weftd.log", "ab"))
    deadline = time.monotonic() + 600
    while not (v.node.dir / "weftd-net.d" / "10-weft.conflist").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"weftd on {v.name} did not start: {(v.node.dir / 'weftd.log').read_text()[-2000:]}")
        time.sleep(0.1)


def install_frozen(lab: Lab) -> Path:
    """A CNI bin dir with the frozen bundle installed as packaging/install.sh does, and the reference plugins."""
    frozen_bin = lab.base / "frozen-bin"
    install_bundle(BUNDLE, frozen_bin / ".weft", frozen_bin)
    for name in ("portmap", "bridge", "host-local"):
        (frozen_bin / name).symlink_to(REFERENCE_DIR / name)
    return frozen_bin


def make_variants(lab: Lab) -> list[Variant]:
    frozen_bin = install_frozen(lab)
    variants = [Variant("reference", lab.node("ref"), None)]
    for build in ("frozen", "source") if SOURCE else ("frozen",):
        for served in (True, False):
            node = lab.node(f"{build[:3]}{'d' if served else 'a'}")
            if build == "frozen":
                node = Node(node.ns, node.dir, frozen_bin, lab)
            v = Variant(f"weft-{build}{'+weftd' if served else ''}", node, build)
            if served:
                start_weftd(lab, v)
            variants.append(v)
    return variants


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def rounds(lab: Lab, variants: list[Variant]) -> None:
    conflists = {(v.name, n): v.conflist(n) for v in variants for n in NETWORKS}
    for r in range(ROUNDS):
        # Each round starts at another variant, so what one variant's work leaves the kernel doing lands on
        # every variant alike.
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for network in NETWORKS:
            pods = []
            for v in order:
                pod = lab.netns("p")
                pods.append(pod)
                for verb in ("add", "check"):
                    took, _ = drive(v, verb, conflists[(v.name, network)], f"r{r}{network}", pod.path)
                    v.times.setdefault(f"{network}:{verb}", []).append(took)
            # The pods' namespaces go only after every DEL, and the DELs wait POD_AGE: the kernel tears a
            # deleted namespace down in the background, and a veth deleted within ~30 ms of that costs it
            # 10-15 ms more (`python -m bench.veth_delete`). Deleting each pod's namespace right after its
            # DEL would charge that to the next variant's DEL, the more the faster its ADD and CHECK are.
            time.sleep(POD_AGE)
            for v, pod in zip(order, pods, strict=True):
                took, _ = drive(v, "del", conflists[(v.name, network)], f"r{r}{network}", pod.path)
                v.times.setdefault(f"{network}:del", []).append(took)
            for pod in pods:
                subprocess.run(["ip", "netns", "del", pod.name], check=True)
                lab.namespaces.remove(pod)
        if r % 10 == 9:
            print(f"  {r + 1}/{ROUNDS} rounds", flush=True)


def burst(lab: Lab, v: Variant) -> dict[str, Any]:
    conflist = v.conflist("plain")
    pods = [lab.netns("b") for _ in range(BURST)]
    out: dict[str, Any] = {}
    lock = threading.Lock()
    for verb in ("add", "del"):
        failures: list[str] = []
        ips: list[str] = []

        def one(i: int, verb: str = verb, failures: list[str] = failures, ips: list[str] = ips) -> None:
            try:
                _, p = drive(v, verb, conflist, f"burst{i}", pods[i].path)
                if verb == "add":
                    with lock:
                        ips.append(json.loads(p.stdout)["ips"][0]["address"])
            except RuntimeError as e:
                with lock:
                    failures.append(str(e)[:200])

        t = time.perf_counter()
        with ThreadPoolExecutor(BURST) as pool:
            list(pool.map(one, range(BURST)))
        out[verb] = {"wall_s": round(time.perf_counter() - t, 3), "failures": len(failures)}
        if verb == "add":
            out[verb]["distinct_addresses"] = len(set(ips))
        if failures:
            print(f"    {v.name} burst {verb}: {failures[0]}")
    for pod in pods:
        subprocess.run(["ip", "netns", "del", pod.name], check=True)
        lab.namespaces.remove(pod)
    return out


def plugin_rss(v: Variant) -> int:
    """Peak RSS (KiB) of one direct ADD+DEL of the `weft` executable, or of bridge for the reference."""
    conf = json.loads(v.conflist("plain").read_text())
    one = {"cniVersion": conf["cniVersion"], "name": conf["name"], **conf["plugins"][0]}
    exe = str(v.node.bin / ("bridge" if v.weft is None else "weft"))
    pod = v.node.lab.netns("rss")
    peak = 0
    for command in ("ADD", "DEL"):
        env = v.node.env(CNI_COMMAND=command, CNI_CONTAINERID="rss", CNI_NETNS=pod.path, CNI_IFNAME="eth0")
        with NetNS(v.node.ns.path).entered():
            p = subprocess.run(["/usr/bin/time", "-f", "%M", exe], input=json.dumps(one), capture_output=True,
                               text=True, env=env)
        peak = max(peak, int(p.stderr.strip().splitlines()[-1]))
    return peak


def weftd_means(v: Variant) -> dict[str, float]:
    """Mean ms spent inside weftd per served command (both networks), from its own histogram."""
    with NetNS(v.node.ns.path).entered():
        text = urllib.request.urlopen("http://127.0.0.1:9808/metrics", timeout=10).read().decode()
    found = {(m[1], m[0]): float(m[2]) for m in
             re.findall(r'^weft_cni_request_seconds_(sum|count)\{command="(\w+)"\} (\S+)$', text, re.M)}
    return {cmd: round(found[(cmd, "sum")] / found[(cmd, "count")] * 1000, 2)
            for cmd, kind in found if kind == "count" and found[(cmd, "count")]}


def report(variants: list[Variant], bursts: dict[str, Any], rss: dict[str, Any]) -> dict[str, Any]:
    ref = variants[0]
    out: dict[str, Any] = {"rounds": ROUNDS, "ops": {}, "burst": bursts, "rss_kib": rss}
    print(f"\n{'variant':22} {'op':12} {'p50 ms':>8} {'p95 ms':>8} {'ratio p50':>10} {'ratio p95':>10}")
    for v in variants:
        for key, xs in v.times.items():
            p50, p95 = statistics.median(xs), percentile(xs, 0.95)
            r50, r95 = p50 / statistics.median(ref.times[key]), p95 / percentile(ref.times[key], 0.95)
            out["ops"].setdefault(v.name, {})[key] = {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2),
                                                      "ratio_p50": round(r50, 2), "ratio_p95": round(r95, 2)}
            print(f"{v.name:22} {key:12} {p50:8.1f} {p95:8.1f} {r50:10.2f} {r95:10.2f}")
    print(f"\nburst of {BURST} concurrent ADDs, then {BURST} concurrent DELs (plain network)")
    for name, b in bursts.items():
        ra = b["add"]["wall_s"] / bursts["reference"]["add"]["wall_s"]
        rd = b["del"]["wall_s"] / bursts["reference"]["del"]["wall_s"]
        b["ratio_add"], b["ratio_del"] = round(ra, 2), round(rd, 2)
        print(f"{name:22} ADD {b['add']['wall_s']:6.2f} s (ratio {ra:.2f}, failures {b['add']['failures']}, "
              f"distinct {b['add']['distinct_addresses']})  DEL {b['del']['wall_s']:6.2f} s (ratio {rd:.2f}, "
              f"failures {b['del']['failures']})")
    print("\npeak RSS, KiB:", ", ".join(f"{k} {v}" for k, v in rss.items()))
    summary(out)
    return out


def summary(out: dict[str, Any]) -> None:
    """The two paths side by side, as ratios weft/reference (at or below 1.0: as fast or faster)."""
    rows = [(f"{label}{verb.upper()}", f"{network}:{verb}") for network, label in (("plain", ""), ("masq", "ipMasq "))
            for verb in ("add", "check", "del")]
    print(f"\n{'ratio weft/reference':22} {'production p50':>15} {'p95':>6} {'standalone p50':>15} {'p95':>6}")
    for label, key in rows:
        cells = [out["ops"][path][key] for path in (PRODUCTION, STANDALONE)]
        print(f"{label:22} {cells[0]['ratio_p50']:15.2f} {cells[0]['ratio_p95']:6.2f} "
              f"{cells[1]['ratio_p50']:15.2f} {cells[1]['ratio_p95']:6.2f}")
    for verb in ("add", "del"):
        b = out["burst"]
        print(f"{f'burst of {BURST}, {verb.upper()}':22} {b[PRODUCTION][f'ratio_{verb}']:15.2f} {'':6} "
              f"{b[STANDALONE][f'ratio_{verb}']:15.2f}")


def main() -> int:
    if not (BUNDLE / "weft").exists():
        print(f"no frozen bundle at {BUNDLE}: run `make build`", file=sys.stderr)
        return 2
    SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    lab = Lab(Path(tempfile.mkdtemp(prefix="weft-bench-")))
    variants: list[Variant] = []
    try:
        variants += make_variants(lab)
        print(f"plugin bench: {ROUNDS} interleaved rounds of ADD, CHECK, DEL per variant and network")
        rounds(lab, variants)
        inside = {v.name: weftd_means(v) for v in variants if v.weftd is not None}
        bursts = {}
        for v in variants:
            if v.name in ("reference", PRODUCTION, STANDALONE):
                bursts[v.name] = burst(lab, v)
        rss: dict[str, Any] = {v.name: plugin_rss(v) for v in variants
                               if v.name in ("reference", PRODUCTION, STANDALONE)}
        for v in variants:
            pid = weftd_pid(v.socket) if v.socket is not None else None
            if pid is not None:
                rss[f"{v.name} (weftd peak)"] = proc_kib(pid, "VmHWM")
        out = report(variants, bursts, rss)
        out["weftd_mean_ms"] = inside
        print("mean ms inside weftd per command, before the bursts:",
              "; ".join(f"{k}: {v}" for k, v in inside.items()))
        print(json.dumps({"plugin_bench": out}, sort_keys=True))
    finally:
        for v in variants:
            if v.weftd is not None:
                v.weftd.terminate()
                v.weftd.wait(15)
        lab.close()
        shutil.rmtree(lab.base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
