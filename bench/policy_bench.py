"""NetworkPolicy benchmarks: compile and apply time at 1,000 pods and 200 policies, what the policy hook
adds to a pod's ADD and DEL at 100, 1,000 and 3,000 pods, and pod-to-pod iperf3 throughput with those
policies in force against without.

Run with `make bench`. Everything runs in namespaces of its own; nothing here has a pass mark.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import netaddr

from bench.dataplane_bench import iperf
from ipam.reservations import Reservations
from tests.cluster import Cluster
from tests.lab import Lab
from weftd.nodeconf import NETWORK_NAME
from weftd.pod import Attachment
from weftd.policy import model
from weftd.policy.compile import PortBinding, State, compile_ruleset, transaction
from weftd.policy.engine import PolicyEngine
from weftd.policy.source import DirSource
from weftlib.cni import skel
from weftlib.cni.result import Interface, IPConfig, Result
from weftlib.kernel import nft
from weftlib.kernel.netlink import host_veth_name
from weftlib.kernel.netns import NetNS

PODS, POLICIES, NAMESPACES = 1000, 200, 20


def objects(pods: int = PODS, policies: int = POLICIES, local_node: str = "n1",
            extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A cluster's worth of objects: NAMESPACES namespaces, pods with app/tier labels and named ports, and
    policies mixing pod and namespace selectors, numeric and named ports, endPort ranges, ipBlocks and
    egress. Half of the pods are on `local_node`."""
    rnd = random.Random(7)
    out: list[dict[str, Any]] = []
    for n in range(NAMESPACES):
        out.append({"kind": "Namespace", "metadata": {"name": f"ns{n}", "labels": {"team": f"t{n % 5}"}}})
    for i in range(pods):
        ns = f"ns{i % NAMESPACES}"
        ip = f"10.{100 + i // 250}.{(i // 250) % 250}.{i % 250 + 1}"
        out.append({"kind": "Pod", "metadata": {"name": f"p{i}", "namespace": ns,
                                                "labels": {"app": f"app{i % 10}", "tier": f"tier{i % 3}"}},
                    "spec": {"nodeName": local_node if i % 2 == 0 else "other",
                             "containers": [{"ports": [{"name": "http", "containerPort": 8080 + i % 4},
                                                       {"name": "metrics", "containerPort": 9100}]}]},
                    "status": {"podIP": ip}})
    for j in range(policies):
        ns = f"ns{j % NAMESPACES}"
        kind = j % 4
        rule: dict[str, Any]
        if kind == 0:
            rule = {"from": [{"podSelector": {"matchLabels": {"app": f"app{rnd.randrange(10)}"}}}],
                    "ports": [{"port": 8080}, {"port": "http"}]}
        elif kind == 1:
            rule = {"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{rnd.randrange(5)}"}},
                              "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                                    "values": ["tier0", "tier1"]}]}}],
                    "ports": [{"port": 9000, "endPort": 9200, "protocol": "TCP"}]}
        elif kind == 2:
            rule = {"from": [{"ipBlock": {"cidr": "10.100.0.0/14", "except": [f"10.10{rnd.randrange(4)}.0.0/24"]}}]}
        else:
            rule = {"from": [{"namespaceSelector": {}}], "ports": [{"port": "metrics"}, {"protocol": "UDP"}]}
        spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": f"app{j % 10}"}}, "ingress": [rule]}
        if j % 5 == 0:
            spec["egress"] = [{"to": [{"namespaceSelector": {"matchLabels": {"team": f"t{j % 5}"}}}],
                               "ports": [{"port": "http"}]}]
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": f"pol{j}", "namespace": ns}, "spec": spec})
    return out + (extra or [])


def state_of(raw: list[dict[str, Any]], node: str) -> tuple[State, list[model.Pod]]:
    s = State.of(model.parse(o) for o in raw)
    return s, [p for p in s.pods if p.node_name == node]


def apply_time(rounds: int = 5) -> dict[str, Any]:
    """What weftd does at its start and at a resync: parse, build the node's whole ruleset, replace both tables
    in one transaction (a change in between sends only its elements and chains: `scale` measures those)."""
    raw = objects()
    lab = Lab(Path(tempfile.mkdtemp(prefix="weft-bench-")))
    try:
        ns = lab.netns("policy")
        netns = NetNS(ns.path)
        parse, comp, apply = [], [], []
        compiled = None
        for r in range(rounds):
            if r:  # a label change on one pod, as between two applies in production
                raw[NAMESPACES + r]["metadata"]["labels"]["app"] = f"app{r}"
            t0 = time.perf_counter()
            state, local = state_of(raw, "n1")
            t1 = time.perf_counter()
            compiled = compile_ruleset(state, local, [PortBinding(f"weft{i:08x}", p.ips) for i, p in enumerate(local)])
            t2 = time.perf_counter()
            with netns.entered():
                status, _, err = nft.run(transaction(compiled.text))
            t3 = time.perf_counter()
            if status != 0:
                raise RuntimeError(err)
            parse.append(t1 - t0)
            comp.append(t2 - t1)
            apply.append(t3 - t2)
        netns.close()
        assert compiled is not None
        total = [a + b + c for a, b, c in zip(parse, comp, apply, strict=True)]
        out = {"pods": PODS, "local_pods": len(local), "policies": POLICIES, "rules": compiled.rules,
               "chains": compiled.chains, "sets": compiled.sets, "ruleset_kib": len(compiled.text) // 1024,
               "parse_ms": round(statistics.median(parse) * 1000, 1),
               "compile_ms": round(statistics.median(comp) * 1000, 1),
               "nft_ms": round(statistics.median(apply) * 1000, 1),
               "total_ms": round(statistics.median(total) * 1000, 1)}
        print(f"  {PODS} pods ({len(local)} on this node), {POLICIES} policies: {compiled.rules} rules in "
              f"{compiled.chains} pod chains, {compiled.sets} sets, {out['ruleset_kib']} KiB; median of {rounds}: "
              f"parse {out['parse_ms']} ms, compile {out['compile_ms']} ms, nft transaction {out['nft_ms']} ms, "
              f"total {out['total_ms']} ms", flush=True)
        return out
    finally:
        lab.close()


HOOK_SIZES = (100, 1000, 3000)
NEW_SUBNET = "10.250.0.0/16"  # the node's pod subnet for the pods ADDed during the benchmark


def hook_time(sizes: tuple[int, ...] = HOOK_SIZES, rounds: int = 7) -> dict[str, Any]:
    """What the policy hook adds to a pod's ADD and DEL through weftd: PolicyEngine.attached and detached,
    with the engine started on `size` pods (half on this node) and POLICIES policies from a policy
    directory. Each ADD is of a pod whose object is already known with its labels but no address yet, as
    when a scheduled pod's sandbox starts; its reservation is made first, as the plugin does."""
    out: dict[str, Any] = {}
    for size in sizes:
        base = Path(tempfile.mkdtemp(prefix="weft-bench-"))
        lab = Lab(base / "lab")
        lab.base.mkdir()
        pdir = base / "policies"
        pdir.mkdir()
        reservations = Reservations(str(base / "ipam"), NETWORK_NAME)
        new = [{"kind": "Pod", "metadata": {"name": f"new{r}", "namespace": f"ns{r % NAMESPACES}",
                                            "labels": {"app": f"app{r % 10}", "tier": f"tier{r % 3}"}},
                "spec": {"nodeName": "n1", "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]}}
               for r in range(rounds)]
        raw = objects(pods=size, extra=new)
        (pdir / "cluster.json").write_text(json.dumps({"kind": "List", "items": raw}))
        with reservations as held:
            for i, o in enumerate(raw):
                if o["kind"] == "Pod" and o["spec"]["nodeName"] == "n1" and "status" in o:
                    held.reserve(ipaddress.ip_address(o["status"]["podIP"]), f"{i:064x}", "eth0")
        try:
            netns = NetNS(lab.netns("policy").path)
            with netns.entered():
                engine = PolicyEngine("n1", DirSource(pdir), base / "bindings.json", Path(reservations.dir),
                                      resync=3600)
                t = time.perf_counter()
                engine.start([netaddr.IPNetwork(NEW_SUBNET)])
                start = time.perf_counter() - t
                first = engine.last
                add, delete = [], []
                for r in range(rounds):
                    cid, ip = f"{r:x}".rjust(64, "f"), ipaddress.ip_address(f"10.250.0.{r + 2}")
                    args = skel.Args("ADD", cid, "/proc/self/ns/net", "eth0",
                                     args={"K8S_POD_NAMESPACE": f"ns{r % NAMESPACES}", "K8S_POD_NAME": f"new{r}"})
                    # As the plugin answers: the bridge, the veth's host end, its pod end with the address.
                    added = Result([Interface("cni0"), Interface(host_veth_name(cid, "eth0")),
                                    Interface("eth0", sandbox="/proc/self/ns/net")],
                                   [IPConfig(ipaddress.ip_interface(f"{ip}/16"), interface=2)])
                    with reservations as held:
                        held.reserve(ip, cid, "eth0")
                    t = time.perf_counter()
                    engine.attached(Attachment.of(args, added))
                    add.append(time.perf_counter() - t)
                for r in range(rounds):
                    with reservations as held:
                        held.release(ipaddress.ip_address(f"10.250.0.{r + 2}"))
                    t = time.perf_counter()
                    engine.detached(f"{r:x}".rjust(64, "f"))
                    delete.append(time.perf_counter() - t)
                engine.stop()
            netns.close()
        finally:
            lab.close()
            subprocess.run(["rm", "-rf", str(base)], check=False)
        ms = [[round(x * 1000, 1) for x in (statistics.median(xs), min(xs), max(xs))] for xs in (add, delete)]
        row: dict[str, Any] = {
            "local_pods": size // 2, "rules": first.rules if first else 0,
            "ruleset_kib": len(first.text) // 1024 if first else 0, "start_ms": round(start * 1000, 1),
            "add_ms": ms[0][0], "add_range_ms": ms[0][1:], "del_ms": ms[1][0], "del_range_ms": ms[1][1:],
            "load": round(os.getloadavg()[0], 1)}
        out[str(size)] = row
        print(f"  {size} pods ({size // 2} on this node), {POLICIES} policies, {row['ruleset_kib']} KiB ruleset: "
              f"first apply {row['start_ms']} ms; median of {rounds}: ADD hook {ms[0][0]} ms ({ms[0][1]}-{ms[0][2]}), "
              f"DEL hook {ms[1][0]} ms ({ms[1][1]}-{ms[1][2]}); load average {row['load']}", flush=True)
    return out


def throughput(cluster: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """iperf3 from a pod on n1 to a pod on n2 without policies and with those of `cluster` (by default 200
    policies and 1,000 pods), plus two in which the server is selected and admits the client, and the client's
    egress is restricted too. Without, with, with, without: the policies are put in, then taken out again."""
    base = Path(tempfile.mkdtemp(prefix="weft-bench-"))
    lab = Lab(base / "lab")
    lab.base.mkdir()
    pdir = base / "policies"
    pdir.mkdir()
    c = Cluster(lab, {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    try:
        n1, n2 = c.boot(["n1", "n2"], extra=("--policy-dir", str(pdir)))
        a, a_ip = c.pod(n1, "a")
        b, b_ip = c.pod(n2, "b")
        without = [iperf(a, b, b_ip)]

        def pod(name: str, ip: str, node: str) -> dict[str, Any]:
            return {"kind": "Pod", "metadata": {"name": name, "namespace": "ns0", "labels": {"app": name}},
                    "spec": {"nodeName": node}, "status": {"podIP": ip}}

        extra = [pod("a", a_ip, "n1"), pod("b", b_ip, "n2"),
                 {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "iperf", "namespace": "ns0"},
                  "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                                        "ports": [{"port": 5201}]}]}},
                 {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "iperf-client", "namespace": "ns0"},
                  "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}}]
        raw = (objects(local_node="n1") if cluster is None else cluster) + extra
        policies = sum(o["kind"] == "NetworkPolicy" for o in raw)

        def applied(count: int) -> None:
            for cn in (n1, n2):
                c.until(lambda cn=cn: f"weft_policies {float(count)}" in cn.http("/metrics")[1], 600,
                        f"{count} policies applied", cn)

        (pdir / ".cluster.json").write_text(json.dumps({"kind": "List", "items": raw}))
        os.replace(pdir / ".cluster.json", pdir / "cluster.json")
        applied(policies)
        _, metrics = n2.http("/metrics")
        rules = next(line.split()[1] for line in metrics.splitlines() if line.startswith("weft_policy_rules "))
        with_policy = [iperf(a, b, b_ip) for _ in range(2)]
        (pdir / "cluster.json").unlink()
        applied(0)
        without.append(iperf(a, b, b_ip))
        w, p = statistics.mean(without), statistics.mean(with_policy)
        print(f"  vxlan pod-to-pod: without policies {w:.2f} Gbit/s, with {policies} policies "
              f"({rules} rules on the server's node) {p:.2f} Gbit/s, ratio {p / w:.3f}", flush=True)
        return {"without_gbps": round(w, 2), "with_gbps": round(p, 2), "ratio": round(p / w, 3),
                "policies": policies, "rules": int(float(rules))}
    finally:
        c.close()
        lab.close()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def main() -> int:
    if sys.argv[1:2] == ["scale"]:  # the curve on the production path: bench/policy_scale.py
        from bench import policy_scale

        return policy_scale.main(sys.argv[2:], throughput)
    if sys.argv[1:2] == ["hook"]:  # only the hook: `python -m bench.policy_bench hook [size ...]`
        sizes = tuple(int(x) for x in sys.argv[2:]) or HOOK_SIZES
        print(json.dumps({"policy_hook": hook_time(sizes)}, sort_keys=True))
        return 0
    print("NetworkPolicy: parse + whole ruleset + one nftables transaction, as weftd does at start and resync")
    out: dict[str, Any] = {"apply": apply_time()}
    print("NetworkPolicy: the policy hook's cost in a pod's ADD and DEL through weftd (PolicyEngine.attached, "
          "detached)")
    out["hook"] = hook_time()
    if os.environ.get("WEFT_BENCH_IPERF", "1") != "0":
        print("NetworkPolicy: iperf3 TCP, 5 s, pod on n1 to pod on n2, with and without policies")
        out["throughput"] = throughput()
    print(json.dumps({"policy_bench": out}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
