"""NetworkPolicy from a real kube-apiserver (tests/kubeapi): weftd on 2 nodes watches Pods, Namespaces
and NetworkPolicies under the manifest's ServiceAccount, as conf/kube-weft.yml runs it."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from tests.cluster import Cluster, ClusterNode
from tests.kubeapi import KubeAPI
from tests.netpol import SERVER, _probe
from tests.test_kube import join, kube_cluster, weft_token  # noqa: F401 - fixtures

NP = "/apis/networking.k8s.io/v1/namespaces/{}/networkpolicies"


class ApiPods:
    """Pods on the kube store's nodes as kubelet makes them: the Pod object, the sandbox (CNI ADD) with a
    server on ports 80 and 81, then the status with its address."""

    def __init__(self, kube: KubeAPI) -> None:
        self.kube = kube
        self.servers: list[subprocess.Popen[bytes]] = []
        self.pods: dict[str, tuple[Any, str]] = {}

    def add(self, ns: str, name: str, cn: ClusterNode) -> None:
        self.kube.create_pod(ns, name, {"pod": name}, node=cn.name)
        netns = cn.node.pod(f"{ns}{name}")
        srv = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", SERVER],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.servers.append(srv)
        assert srv.stdout is not None and srv.stdout.readline().strip() == b"up"
        res = cn.node.drive("add", cn.conflist, f"{ns}-{name}", netns.path,
                            CNIDRIVE_ARGS=f"K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}").json
        ip = res["ips"][0]["address"].split("/")[0]
        self.kube.core.patch_namespaced_pod_status(name, ns, {"status": {"phase": "Running", "podIP": ip,
                                                                        "podIPs": [{"ip": ip}]}})
        self.pods[f"{ns}/{name}"] = (netns, ip)

    def reach(self, a: str, b: str, port: int = 80) -> bool:
        return _probe(self.pods[a][0].path, self.pods[b][1], port, "TCP", 0.5)

    def table(self) -> dict[tuple[str, str], bool]:
        return {(a, b): self.reach(a, b) for a in self.pods for b in self.pods if a != b}

    def everyone(self) -> dict[tuple[str, str], bool]:
        return {(a, b): True for a in self.pods for b in self.pods if a != b}

    def close(self) -> None:
        for srv in self.servers:
            srv.kill()
            srv.wait()


def test_policy_from_the_api_server(kube_api: KubeAPI, kube_cluster: Cluster) -> None:  # noqa: F811
    kube, c = kube_api, kube_cluster
    n1 = join(kube, c, "n1", "10.244.1.0/24")
    n2 = join(kube, c, "n2", "10.244.2.0/24")
    p = ApiPods(kube)
    add, reach, table = p.add, p.reach, p.table
    for ns in ("x", "y"):
        kube.create_namespace(ns, {"ns": ns})
    try:
        add("x", "a", n1)
        add("x", "b", n2)
        add("y", "a", n2)
        everyone = p.everyone()
        c.until(lambda: table() == everyone, 60, "every pod reaches every pod")

        # Only y may reach x/a: same-node (x/b is on n2 like y/a, x/a on n1) and across vxlan.
        status, obj = kube.request("POST", NP.format("x"), {
            "metadata": {"name": "from-y"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}})
        assert status == 201, obj
        want = {**everyone, ("x/b", "x/a"): False}
        c.until(lambda: table() == want, 60, "x/a reachable only from y", n1)

        # A namespace label change through the API: y loses the label, x gains it.
        kube.core.patch_namespace("y", {"metadata": {"labels": {"ns": "other"}}})
        kube.core.patch_namespace("x", {"metadata": {"labels": {"ns": "y"}}})
        want = {**everyone, ("y/a", "x/a"): False}
        c.until(lambda: table() == want, 60, "namespace labels followed", n1)

        # A pod added after the policy is isolated when its ADD returns: x/c selected by a deny-all.
        status, obj = kube.request("POST", NP.format("x"), {
            "metadata": {"name": "deny-c"}, "spec": {"podSelector": {"matchLabels": {"pod": "c"}}}})
        assert status == 201, obj
        c.until(lambda: "policy x/deny-c applied" in n1.log.read_text(), 60, "deny-c known on n1", n1)
        add("x", "c", n1)
        assert not reach("y/a", "x/c") and not reach("x/b", "x/c")
        assert reach("x/c", "y/a")

        # Deleting the policies restores everything.
        for name in ("from-y", "deny-c"):
            assert kube.request("DELETE", NP.format("x") + "/" + name)[0] == 200
        c.until(lambda: table() == p.everyone(), 60, "policies gone", n1)
    finally:
        p.close()
        for ns in ("x", "y"):
            kube.delete_namespace(ns)
