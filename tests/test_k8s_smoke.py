"""A real two-node Kubernetes cluster (tests/k8s) with Weft installed from conf/kube-weft.yml: kubelet asks
Weft for every pod's network through containerd's CRI, kube-proxy routes Services, and NetworkPolicy comes
from the API server (--policy-kube). Then `down` must leave nothing on the machine.

The cluster is booted once for the module by `python -m tests.k8s up`, as `make cluster` does, in a
directory of its own, .build/cluster-smoke (so a `make cluster` running beside it is not touched; and
not under pytest's temporary directories, which another pytest run may clean up while it runs). The tests run in order;
the last one takes the cluster down and checks what is left.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import _host_settings, _root_links
from tests.k8s.cluster import Cluster
from tests.k8s.layout import KUBE_BIN, Layout, image_selection, missing_binaries
from tests.k8s.node import cgroup_hierarchies
from tests.lab import ROOT

BUSYBOX = "docker.io/library/busybox:1.29"
HOST_PORT = 30080
# Each pod serves its own name over HTTP on 8080.
SERVE = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"


@dataclass
class Booted:
    cluster: Cluster
    settings: dict[Path, str]  # the machine's own settings before the cluster booted
    links: set[str]  # the machine's own links before

    @property
    def layout(self) -> Layout:
        return self.cluster.layout

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, input=input, check=check, timeout=timeout)

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def pod(self, name: str) -> dict[str, Any]:
        pod: dict[str, Any] = json.loads(self.kubectl("get", "pod", name, "-o", "json").stdout)
        return pod

    def fetch(self, pod: str, url: str, timeout: int = 3) -> str | None:
        """What `wget` in `pod` gets from `url`, or None when it gets nothing within `timeout` seconds."""
        # busybox 1.35 wget crashes with -T: the time limit is timeout's.
        p = self.kubectl("exec", pod, "--", "timeout", str(timeout), "wget", "-q", "-O", "-", url, check=False,
                         timeout=timeout + 30)
        return p.stdout.strip() if p.returncode == 0 else None

    def eventually(self, pod: str, url: str, expect: str | None, within: float = 60) -> None:
        """`pod` fetching `url` gets `expect` (None: nothing) within `within` seconds: Services and policies
        take effect once kube-proxy and weftd have seen them."""
        deadline = time.monotonic() + within
        got = self.fetch(pod, url)
        while got != expect and time.monotonic() < deadline:
            time.sleep(1)
            got = self.fetch(pod, url)
        assert got == expect, f"{pod} -> {url}: {got!r}, expected {expect!r}\n{self.cluster.describe()}"


def server(name: str, node: str, host_port: int | None = None) -> dict[str, Any]:
    port: dict[str, Any] = {"containerPort": 8080, "name": "http"}
    if host_port is not None:
        port["hostPort"] = host_port
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "web", "image": BUSYBOX, "command": ["sh", "-c", SERVE],
                                     "ports": [port]}]}}


def service(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": "http"}]}}


@pytest.fixture(scope="module")
def booted() -> Iterator[Booted]:
    missing = missing_binaries()
    if missing:
        pytest.fail(f"no {', '.join(missing)} in {KUBE_BIN}: run `make kube kubectl image test-images`")
    directory = ROOT / ".build" / "cluster-smoke"
    cluster = Cluster(directory)
    cluster.down()  # what an earlier run left, if it was killed
    images = image_selection(ROOT / ".build" / "cluster-smoke-images")
    settings, links = _host_settings(), _root_links()
    up = subprocess.run([sys.executable, "-m", "tests.k8s", "--dir", str(directory), "up", "--nodes", "2",
                         "--images", str(images)],
                        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    try:
        assert up.returncode == 0, f"up failed:\n{up.stdout}{up.stderr}"
        yield Booted(cluster, settings, links)
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def servers(booted: Booted) -> dict[str, str]:
    """server-a on the control-plane node, server-b on the worker (with a hostPort): name -> pod IP."""
    booted.apply(server("server-a", "weft-control-plane"), server("server-b", "weft-worker", HOST_PORT),
                 service("server-a"), service("server-b"))
    booted.kubectl("wait", "--for=condition=Ready", "pod/server-a", "pod/server-b", "--timeout=180s", timeout=200)
    return {name: booted.pod(name)["status"]["podIP"] for name in ("server-a", "server-b")}


def test_nodes_ready_with_weft_subnets(booted: Booted) -> None:
    nodes = json.loads(booted.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["weft-control-plane", "weft-worker"]
    for n in nodes:
        assert n["spec"]["podCIDR"].startswith("10.244."), n["spec"]
    pods = json.loads(booted.kubectl("-n", "kube-weft", "get", "pods", "-o", "json").stdout)["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["weft-control-plane", "weft-worker"]
    assert all(p["spec"]["containers"][0]["image"] == "weft:0.1.0" for p in pods)


def test_pods_on_two_nodes_reach_each_other(booted: Booted, servers: dict[str, str]) -> None:
    a, b = servers["server-a"], servers["server-b"]
    nodes = {name: booted.pod(name)["spec"]["nodeName"] for name in servers}
    assert nodes == {"server-a": "weft-control-plane", "server-b": "weft-worker"}
    cidrs = {n["metadata"]["name"]: ipaddress.ip_network(n["spec"]["podCIDR"])
             for n in json.loads(booted.kubectl("get", "nodes", "-o", "json").stdout)["items"]}
    for pod, ip in servers.items():  # an address of its node's podCIDR, from Weft
        assert ipaddress.ip_address(ip) in cidrs[nodes[pod]], (pod, ip, cidrs)
    booted.eventually("server-a", f"http://{b}:8080/", "server-b")
    booted.eventually("server-b", f"http://{a}:8080/", "server-a")


def test_cluster_ip_across_nodes_and_hairpin(booted: Booted, servers: dict[str, str]) -> None:
    ips = {name: booted.kubectl("get", "svc", name, "-o", "jsonpath={.spec.clusterIP}").stdout for name in servers}
    booted.eventually("server-a", f"http://{ips['server-b']}/", "server-b")
    booted.eventually("server-a", f"http://{ips['server-a']}/", "server-a")  # itself, through its Service


def test_host_port(booted: Booted, servers: dict[str, str]) -> None:
    worker = booted.layout.ip(1)
    booted.eventually("server-a", f"http://{worker}:{HOST_PORT}/", "server-b")


def test_network_policy_denies_then_allows(booted: Booted, servers: dict[str, str]) -> None:
    b = servers["server-b"]
    booted.eventually("server-a", f"http://{b}:8080/", "server-b")
    spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": "server-b"}}, "policyTypes": ["Ingress"]}
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "b-ingress"},
            "spec": spec}
    booted.apply(deny)
    booted.eventually("server-a", f"http://{b}:8080/", None)
    spec["ingress"] = [{"from": [{"podSelector": {"matchLabels": {"app": "server-a"}}}],
                                "ports": [{"port": "http"}]}]
    booted.apply(deny)
    booted.eventually("server-a", f"http://{b}:8080/", "server-b")
    booted.kubectl("delete", "networkpolicy", "b-ingress")


def test_kubelet_sysctls_stay_in_the_nodes(booted: Booted) -> None:
    """kubelet wrote its global sysctls (kernel.panic=10 among them) into the nodes' own files; the machine's
    values are those it had before the cluster."""
    holder = next(e for e in booted.layout.record.entries("node") if e["name"] == "weft-worker")["holder"]
    seen = subprocess.run(["nsenter", f"--target={holder}", "--mount", "--root", "cat", "/proc/sys/kernel/panic"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert seen == "10"
    assert _host_settings() == booted.settings


def test_down_leaves_nothing(booted: Booted) -> None:
    layout = booted.layout
    record = layout.record
    pids = [e["pid"] for e in record.entries("process")]
    roots = [e["cgroup"] for e in record.entries("node")]
    down = subprocess.run([sys.executable, "-m", "tests.k8s", "--dir", str(layout.dir), "down"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not record.entries()
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"processes left: {alive}"
    strays = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            cgroups = (proc / "cgroup").read_text()
            # a container process killed with its shim is a zombie until the machine's init reaps it
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if zombie:
            continue
        if str(layout.dir) in cmdline or any(f":{root}" in cgroups for root in roots):
            strays.append(f"{proc.name}: {cmdline}")
    assert not strays, strays
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert layout.tag not in netns
    mounts = Path("/proc/self/mountinfo").read_text()
    assert layout.tag not in mounts and str(layout.dir) not in mounts
    left = [str(h.mountpoint / root.lstrip("/")) for h in cgroup_hierarchies() for root in roots
            if (h.mountpoint / root.lstrip("/")).exists()]
    assert not left, f"cgroups left: {left}"
    assert _root_links() == booted.links
    assert _host_settings() == booted.settings
    assert not any(layout.node_dir(n).exists() for n in ("weft-control-plane", "weft-worker"))
