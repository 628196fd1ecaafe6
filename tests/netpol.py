"""The upstream NetworkPolicy e2e model (kubernetes test/e2e/network/netpol) on simulated nodes.

Namespaces x, y, z (label ns=<name>), each with pods a, b, c (label pod=<name>), spread over the nodes;
every pod serves TCP and UDP on 80 and 81 over both families (named ports serve-80-tcp, ...). Objects are written to the
directory every weftd reads with --policy-dir. A reachability table holds, for each (client, server,
port, protocol), whether a new connection must get through; probes run in parallel, each thread
entering the client pod's network namespace.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import Cluster, ClusterNode
from tests.lab import Lab, Netns
from weftlib.kernel.netns import NetNS

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
SERVED = ((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP"))
PROBE_TIMEOUT = 1.0
# How long a probe that should pass waits for its answer: a loaded machine can take seconds to run the
# pod's server, and a pass returns at once. A probe that should be denied keeps PROBE_TIMEOUT: an
# answer is the failure, so a short wait is honest.
PASS_TIMEOUT = 10.0
SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in (80, 81):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        if kind == socket.SOCK_STREAM:
            s.listen(128)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, kind)
print("up", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            if key.data == socket.SOCK_STREAM:
                c, _ = s.accept()
                c.setblocking(True)
                c.settimeout(1)
                c.sendall(b"ok")
                c.close()
            else:
                data, addr = s.recvfrom(64)
                s.sendto(b"ok", addr)
        except OSError:
            pass
"""


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class ModelPod:
    namespace: str
    name: str
    node: ClusterNode
    netns: Netns
    ip: str = ""  # IPv4, or the only address
    ip6: str = ""  # IPv6 beside an IPv4 address (dual stack)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def obj(self) -> dict[str, Any]:
        ports = [{"name": f"serve-{p}-{proto.lower()}", "containerPort": p, "protocol": proto} for p, proto in SERVED]
        ips = [ip for ip in (self.ip, self.ip6) if ip]
        status = {"podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]} if ips else {}
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
                "spec": {"nodeName": self.node.name, "containers": [{"name": "cont", "ports": ports}]},
                "status": status}


Key = tuple[str, str, int, str]  # client, server, port, protocol


class Reachability:
    """Expected outcomes, true by default, adjusted like upstream's ExpectPeer/ExpectAllIngress/Egress."""

    def __init__(self, pods: Iterable[str], ports: Iterable[tuple[int, str]] = ((80, "TCP"),)) -> None:
        self.pods = list(pods)
        self.ports = list(ports)
        self.want: dict[Key, bool] = {(a, b, p, proto): True for a in self.pods for b in self.pods
                                      for p, proto in self.ports}

    def set(self, clients: Iterable[str] | str, servers: Iterable[str] | str, ok: bool,
            ports: Iterable[tuple[int, str]] | None = None) -> Reachability:
        cl = [clients] if isinstance(clients, str) else list(clients)
        sv = [servers] if isinstance(servers, str) else list(servers)
        for a in cl:
            for b in sv:
                for p, proto in (ports if ports is not None else self.ports):
                    if a != b and (a, b, p, proto) in self.want:  # a pod always reaches itself
                        self.want[(a, b, p, proto)] = ok
        return self

    def ingress(self, server: str, ok: bool, ports: Iterable[tuple[int, str]] | None = None) -> Reachability:
        return self.set(self.pods, server, ok, ports)

    def egress(self, client: str, ok: bool, ports: Iterable[tuple[int, str]] | None = None) -> Reachability:
        return self.set(client, self.pods, ok, ports)

    def render(self, got: dict[Key, bool]) -> str:
        lines = []
        for p, proto in self.ports:
            lines.append(f"{proto}/{p}  (rows: client, columns: server; X: got != expected)")
            lines.append("      " + " ".join(f"{b:>4}" for b in self.pods))
            for a in self.pods:
                cells = []
                for b in self.pods:
                    k = (a, b, p, proto)
                    mark = "." if got[k] else "-"
                    cells.append(f"{mark if got[k] == self.want[k] else 'X' + mark:>4}")
                lines.append(f"{a:>5} " + " ".join(cells))
        return "\n".join(lines)


def _probe(netns_path: str, ip: str, port: int, proto: str, timeout: float) -> bool:
    ns = NetNS(netns_path)
    try:
        with ns.entered():
            kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, kind)
    finally:
        ns.close()
    with s:
        s.settimeout(timeout)
        try:
            if proto == "TCP":
                s.connect((ip, port))
            else:
                s.sendto(b"probe", (ip, port))
            return s.recv(8) == b"ok"
        except OSError:
            return False


class NetpolModel:
    def __init__(self, cluster: Cluster, nodes: list[ClusterNode], policy_dir: Path) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self.dir = policy_dir
        self.pods: dict[str, ModelPod] = {}
        self.ns_labels: dict[str, dict[str, str]] = {ns: {"ns": ns} for ns in NAMESPACES}
        self.pool = ThreadPoolExecutor(max_workers=128)
        self.servers: list[subprocess.Popen[bytes]] = []

    # ---- objects ----

    def write_namespaces(self) -> None:
        items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}
                 for ns, labels in self.ns_labels.items()]
        atomic_write(self.dir / "namespaces.yaml", yaml.safe_dump({"apiVersion": "v1", "kind": "List",
                                                                    "items": items}))

    def write_pod(self, pod: ModelPod) -> None:
        atomic_write(self.dir / f"pod-{pod.namespace}-{pod.name}.json", json.dumps(pod.obj()))

    def apply(self, name: str, *objects: dict[str, Any]) -> None:
        atomic_write(self.dir / f"{name}.yaml", yaml.safe_dump_all(list(objects)))

    def delete(self, name: str) -> None:
        (self.dir / f"{name}.yaml").unlink()

    def clear_policies(self) -> None:
        for p in self.dir.glob("*.yaml"):
            if p.name != "namespaces.yaml":
                p.unlink()

    # ---- pods ----

    def add_pod(self, namespace: str, name: str, node: ClusterNode, publish: bool = True, serve: bool = False,
                known: bool = True) -> ModelPod:
        """A pod as Kubernetes makes one: its object first (unless `known` is False), then the CNI ADD,
        then its address in the object's status. With `serve`, its servers listen before the ADD."""
        pod = ModelPod(namespace, name, node, node.node.pod(f"{namespace}{name}"), labels={"pod": name})
        self.pods[pod.id] = pod
        if known:
            self.write_pod(pod)
        if serve:
            self.serve(pod)
        self.attach(pod)
        if publish and known:
            self.write_pod(pod)
        return pod

    def remove_pod(self, pod_id: str) -> None:
        pod = self.pods.pop(pod_id)
        pod.node.node.drive("del", pod.node.conflist, f"{pod.namespace}-{pod.name}", pod.netns.path)
        (self.dir / f"pod-{pod.namespace}-{pod.name}.json").unlink(missing_ok=True)

    def attach(self, pod: ModelPod) -> None:
        res = pod.node.node.drive("add", pod.node.conflist, f"{pod.namespace}-{pod.name}", pod.netns.path,
                                  CNIDRIVE_ARGS=f"K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name}").json
        ips = [ip["address"].split("/")[0] for ip in res["ips"]]
        pod.ip = ips[0]
        pod.ip6 = next((ip for ip in ips[1:] if ":" in ip), "")

    def serve(self, pod: ModelPod) -> None:
        srv = subprocess.Popen(["ip", "netns", "exec", pod.netns.name, sys.executable, "-c", SERVER],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"up"
        self.servers.append(srv)

    def build(self) -> None:
        self.write_namespaces()
        for i, ns in enumerate(NAMESPACES):
            for j, name in enumerate(PODS):
                self.add_pod(ns, name, self.nodes[(i + j) % len(self.nodes)])
        for pod in list(self.pods.values()):
            self.serve(pod)

    def set_pod_labels(self, pod_id: str, labels: dict[str, str]) -> None:
        pod = self.pods[pod_id]
        pod.labels = labels
        self.write_pod(pod)

    def set_namespace_labels(self, ns: str, labels: dict[str, str]) -> None:
        self.ns_labels[ns] = labels
        self.write_namespaces()

    # ---- probes ----

    def reachability(self, ports: Iterable[tuple[int, str]] = ((80, "TCP"),),
                     pods: Iterable[str] | None = None) -> Reachability:
        return Reachability(sorted(self.pods if pods is None else pods), ports)

    def probe(self, r: Reachability, family: int = 4) -> dict[Key, bool]:
        """Every pair of `r` once, in parallel; a pair `r` wants to pass waits PASS_TIMEOUT, one it wants
        denied PROBE_TIMEOUT."""
        keys = list(r.want)
        futures = [self.pool.submit(_probe, self.pods[a].netns.path,
                                    self.pods[b].ip6 if family == 6 else self.pods[b].ip, p, proto,
                                    PASS_TIMEOUT if r.want[(a, b, p, proto)] else PROBE_TIMEOUT)
                   for a, b, p, proto in keys]
        return {k: f.result() for k, f in zip(keys, futures, strict=True)}

    def expect(self, r: Reachability, within: float = 60.0, family: int = 4) -> float:
        """Probes (to IPv4 addresses, or IPv6 with family=6) until the table matches (changes take effect
        asynchronously); the seconds it took."""
        start = time.monotonic()
        while True:
            got = self.probe(r, family=family)
            if got == r.want:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                wrong = sum(got[k] != r.want[k] for k in r.want)
                logs = "".join(f"\n--- {n.name} ---\n" + n.log.read_text()[-2000:] for n in self.nodes)
                raise AssertionError(f"{wrong} IPv{family} probes differ from the expected table:\n"
                                     f"{r.render(got)}{logs}")
            time.sleep(0.2)

    def effect(self, client: str, server: str, want: bool, port: int = 80, proto: str = "TCP",
               within: float = 60.0) -> float:
        """Seconds until one pair's outcome becomes `want`, probed with short timeouts: the latency of a
        change, measured from the moment this is called (right after the change was written)."""
        start = time.monotonic()
        while time.monotonic() - start < within:
            if probe_once(self.pods[client], self.pods[server].ip, port, proto, timeout=0.1) == want:
                return time.monotonic() - start
        raise AssertionError(f"{client} -> {server} {proto}/{port} did not become {want} within {within}s")

    def close(self) -> None:
        for srv in self.servers:
            srv.kill()
            srv.wait()
        self.pool.shutdown()


def probe_once(pod: ModelPod, ip: str, port: int = 80, proto: str = "TCP", timeout: float = PROBE_TIMEOUT) -> bool:
    return _probe(pod.netns.path, ip, port, proto, timeout)


@contextmanager
def policy_cluster(base: Path, net: dict[str, Any], names: list[str] | None = None, extra: tuple[str, ...] = (),
                   weftd: list[str] | None = None) -> Iterator[NetpolModel]:
    """Simulated nodes (`names`, default n1-n3) under `base`, every weftd (this checkout's, or `weftd`) reading
    one --policy-dir; the model over them, with no namespaces or pods yet. Everything is closed after, also
    when the set-up fails."""
    lab = Lab(base / "lab")
    lab.base.mkdir()
    policies = base / "policies"
    policies.mkdir()
    cluster = Cluster(lab, net)
    if weftd is not None:
        cluster.weftd = weftd
    m = None
    try:
        nodes = cluster.boot(names, extra=("--policy-dir", str(policies), *extra))
        m = NetpolModel(cluster, nodes, policies)
        yield m
    finally:
        if m is not None:
            m.close()
        cluster.close()
        lab.close()
