"""weftd's kube store against a real kube-apiserver (tests/kubeapi), with conf/kube-weft.yml applied.

weftd runs in simulated nodes under the manifest's ServiceAccount, with a token from the
TokenRequest API, and reaches the server across the underlay. The server's audit log shows every
request weftd made and the answer it got.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from tests.cluster import Cluster, ClusterNode, MakeCluster
from tests.kubeapi import KubeAPI
from tests.lab import ROOT, ping
from tests.test_weftd import all_pods_reach_each_other
from weftd.policy import kube as policy_kube
from weftd.subnet import kube as store

MANIFEST = ROOT / "conf" / "kube-weft.yml"
SA_USER = "system:serviceaccount:kube-weft:weft"


def manifest() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _missing(want: Any, got: Any, path: str = "") -> list[str]:
    """Where the server's object lacks or changed what the manifest says (the server adds defaults)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: {got!r}"]
        return [m for k, v in want.items() for m in _missing(v, got.get(k), f"{path}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: {got!r}"]
        return [m for i, (w, g) in enumerate(zip(want, got, strict=True)) for m in _missing(w, g, f"{path}[{i}]")]
    return [] if want == got else [f"{path}: {want!r} != {got!r}"]


# Where each kind of the manifest is created: (API prefix, plural, namespaced).
PATHS = {"Namespace": ("/api/v1", "namespaces", False), "ServiceAccount": ("/api/v1", "serviceaccounts", True),
         "ConfigMap": ("/api/v1", "configmaps", True), "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
         "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
         "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False)}


def create(kube: KubeAPI, doc: dict[str, Any]) -> tuple[int, Any]:
    """POSTs an object as written (no client-side model in between); on 409, reads the stored one."""
    prefix, plural, namespaced = PATHS[doc["kind"]]
    collection = (f"{prefix}/namespaces/{doc['metadata']['namespace']}/{plural}" if namespaced
                  else f"{prefix}/{plural}")
    status, obj = kube.request("POST", collection, doc)
    if status == 409:
        return kube.request("GET", f"{collection}/{doc['metadata']['name']}")
    return status, obj


def apply_manifest(kube: KubeAPI) -> list[dict[str, Any]]:
    """Creates every object of the manifest; returns what the server stored."""
    stored = []
    for doc in manifest():
        status, obj = create(kube, doc)
        assert status in (200, 201), (doc["kind"], doc["metadata"]["name"], obj)
        stored.append(obj)
    return stored


def remove_manifest(kube: KubeAPI) -> None:
    for doc in manifest():
        name = doc["metadata"]["name"]
        if doc["kind"] == "ClusterRole":
            kube._ignore_404(lambda name=name: kube.rbac.delete_cluster_role(name))
        elif doc["kind"] == "ClusterRoleBinding":
            kube._ignore_404(lambda name=name: kube.rbac.delete_cluster_role_binding(name))
        elif doc["kind"] == "Namespace":
            kube.delete_namespace(name)


@pytest.fixture
def weft_token(kube_api: KubeAPI) -> Iterator[str]:
    """conf/kube-weft.yml applied, and a token for its ServiceAccount."""
    apply_manifest(kube_api)
    try:
        yield kube_api.token("kube-weft", "weft")
    finally:
        remove_manifest(kube_api)


@contextmanager
def kube_store_cluster(kube: KubeAPI, make_cluster: MakeCluster, token: str, backend: str,
                       **opts: Any) -> Iterator[Cluster]:
    """Simulated nodes whose weftd uses the kube store, as the manifest's ServiceAccount (`token`), across
    the underlay to the API server; their Node objects are deleted after."""
    c = make_cluster(backend, store="kube", **opts)
    kube.attach(c.underlay)
    c.kubeconfig = kube.kubeconfig(c.dir / "kubeconfig", token=token)
    try:
        yield c
    finally:
        kube.delete_all_nodes()


@pytest.fixture
def kube_cluster(kube_api: KubeAPI, make_cluster: MakeCluster, weft_token: str) -> Iterator[Cluster]:
    with kube_store_cluster(kube_api, make_cluster, weft_token, "vxlan") as c:
        yield c


def _audit_mark(kube: KubeAPI) -> int:
    return len(list(kube.audit()))


def _weftd_requests(kube: KubeAPI, mark: int) -> list[dict[str, Any]]:
    return [e for e in list(kube.audit())[mark:] if e["user"]["username"] == SA_USER]


def _resource(event: dict[str, Any]) -> str:
    ref = event.get("objectRef") or {}
    return ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")


def join(kube: KubeAPI, c: Cluster, name: str, cidr: str) -> ClusterNode:
    """What kubelet and the controller-manager would do for a new node, then weftd on it."""
    cn = c.nodes.get(name) or c.add_node(name)
    kube.create_node(name, [cidr, f"fd00:10:244:{cidr.split('.')[2]}::/64"], internal_ip=cn.ip)
    # kubelet's condition, and the one the node lifecycle controller starts every node with:
    kube.core.patch_node_status(name, {"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "cni not initialized"},
        {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated", "message": "no routes"}]}})
    c.start(cn)
    c.wait_ready(cn)
    return cn


def conditions(kube: KubeAPI, name: str) -> dict[str, dict[str, Any]]:
    return {cond["type"]: cond for cond in kube.node(name)["status"].get("conditions", [])}


def peer_routes(cn: ClusterNode) -> set[str]:
    return {r["dst"] for r in cn.routes()}


@pytest.mark.slow
def test_kube_store_end_to_end(kube_api: KubeAPI, kube_cluster: Cluster) -> None:
    kube, c = kube_api, kube_cluster
    mark = _audit_mark(kube)
    n1 = join(kube, c, "n1", "10.244.1.0/24")
    n2 = join(kube, c, "n2", "10.244.2.0/24")
    c.until(lambda: peer_routes(n1) == {"10.244.2.0/24"} and peer_routes(n2) == {"10.244.1.0/24"}, 60,
            "routes between n1 and n2")

    # Annotations, patched through nodes/status, say how to reach each node's VTEP.
    for cn in (n1, n2):
        ann = kube.node(cn.name)["metadata"]["annotations"]
        assert ann[store.ANN_MANAGED] == "true" and ann[store.ANN_TYPE] == "vxlan" and ann[store.ANN_IP] == cn.ip
        assert json.loads(ann[store.ANN_DATA]) == {"VNI": 1, "VtepMAC": cn.ns.links()["weft.1"]["address"]}
        assert cn.state()["WEFT_SUBNET"] == kube.node(cn.name)["spec"]["podCIDRs"][0].replace(".0/24", ".1/24")
    # NetworkUnavailable=False once routes are in place, merged with the conditions others own.
    for cn in (n1, n2):
        c.until(lambda cn=cn: conditions(kube, cn.name)["NetworkUnavailable"]["status"] == "False", 60,
                f"{cn.name} NetworkUnavailable=False", cn)
        conds = conditions(kube, cn.name)
        assert conds["NetworkUnavailable"]["reason"] == "WeftIsUp"
        assert conds["NetworkUnavailable"]["message"] == "Weft is running on this node"
        assert conds["Ready"]["reason"] == "KubeletNotReady"

    _, ip2 = c.pod(n2, "p2")
    ns1, _ = c.pod(n1, "p1")
    assert ping(ns1, ip2)

    # A node joins: the others learn it through the watch.
    n3 = join(kube, c, "n3", "10.244.3.0/24")
    c.until(lambda: peer_routes(n1) == {"10.244.2.0/24", "10.244.3.0/24"}
            and peer_routes(n2) == {"10.244.1.0/24", "10.244.3.0/24"}
            and peer_routes(n3) == {"10.244.1.0/24", "10.244.2.0/24"}, 60, "routes to n3")
    # ... and leaves: its Node object is deleted.
    c.stop(n3)
    kube.delete_node("n3")
    c.until(lambda: peer_routes(n1) == {"10.244.2.0/24"} and peer_routes(n2) == {"10.244.1.0/24"}, 60,
            "routes to n3 removed")

    # The API server restarts while weftd runs. Something else was written meanwhile (a ConfigMap),
    # so the restarted server's watch cache starts past the last Node version weftd saw: resuming the
    # watch gets a real 410 Gone, and weftd lists again.
    kube.core.create_namespaced_config_map("default", {"metadata": {"name": f"bump-{time.monotonic_ns()}"}})
    restart_began = datetime.now(UTC)
    seen = {cn.name: len(cn.log.read_text()) for cn in (n1, n2)}
    kube.stop_server()
    for cn in (n1, n2):  # weftd's watch fails and retries against a closed port
        c.until(lambda cn=cn: "Node list/watch: " in cn.log.read_text()[seen[cn.name]:], 60,
                f"{cn.name}'s watch failing while the API server is away", cn)
    assert peer_routes(n1) == {"10.244.2.0/24"}, "routes must stay while the API server is away"
    kube.start()
    restarted = datetime.now(UTC)
    relisted = re.compile(r"Node list/watch: resourceVersion \d+ is gone \(410\b.*\): listing again")
    c.until(lambda: all(relisted.search(cn.log.read_text()) for cn in (n1, n2)), 60,
            "the Node watch relists after 410 Gone")
    n3 = join(kube, c, "n3", "10.244.3.0/24")
    c.until(lambda: peer_routes(n1) == {"10.244.2.0/24", "10.244.3.0/24"}, 60, "n1 learns n3 after the restart")
    ns3, _ = c.pod(n3, "p3")
    assert ping(ns3, ip2)

    # RBAC: every request weftd made was allowed (the role is sufficient) and every permission the
    # ClusterRole grants was used (it is minimal). While a restarted server has not loaded its RBAC
    # objects yet it answers 403 to everyone (weftd retries): those answers do not count.
    requests = _weftd_requests(kube, mark)
    denied = [(e["verb"], e["requestURI"], e["responseStatus"]["code"]) for e in requests
              if e["responseStatus"]["code"] in (401, 403)
              and not restart_began <= datetime.fromisoformat(e["requestReceivedTimestamp"]) <= restarted]
    assert requests and not denied, denied
    used = {(_resource(e), e["verb"]) for e in requests}
    (role,) = [d for d in manifest() if d["kind"] == "ClusterRole"]
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert used == granted == set(store.API_CALLS) | set(policy_kube.API_CALLS), (used, granted)


def test_manifest_passes_server_side_validation(kube_api: KubeAPI) -> None:
    """Every object of conf/kube-weft.yml is created by the server, and kept as written: kube-apiserver
    1.20 drops unknown fields silently, so a misspelled one shows up as missing from what it stored."""
    try:
        stored = apply_manifest(kube_api)
        for doc, obj in zip(manifest(), stored, strict=True):
            assert _missing(doc, obj) == [], f"{doc['kind']}/{doc['metadata']['name']}: {_missing(doc, obj)}"
        # What the check above catches: the server drops a misspelled field and stores the rest.
        typo = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "typo", "namespace": "kube-weft"},
                "dta": {"net-conf.json": "{}"}}
        status, obj = create(kube_api, typo)
        assert status == 201 and _missing(typo, obj) == [".dta: None"]
        # And an invalid object is refused.
        bad = {**manifest()[-1], "metadata": {"name": "broken", "namespace": "kube-weft"}}
        bad["spec"] = {**bad["spec"], "selector": {"matchLabels": {"app": "other"}}}
        status, obj = create(kube_api, bad)
        assert status == 422 and "selector" in obj["message"], obj
    finally:
        remove_manifest(kube_api)


def test_weftd_without_the_role_is_refused(kube_api: KubeAPI, kube_cluster: Cluster) -> None:
    """The RBAC check above can fail: with the ClusterRoleBinding gone, the same token gets 403 and
    weftd never becomes ready."""
    kube, c = kube_api, kube_cluster
    kube.rbac.delete_cluster_role_binding("weft")
    mark = _audit_mark(kube)
    cn = c.add_node("n1")
    kube.create_node("n1", ["10.244.1.0/24"], internal_ip=cn.ip)
    c.start(cn)
    c.until(lambda: "403" in cn.log.read_text(), 60, "weftd told it is forbidden", cn)
    assert not cn.conflist.exists()
    assert {e["responseStatus"]["code"] for e in _weftd_requests(kube, mark)} == {403}
    assert "weft.dev/kube-subnet-manager" not in (kube.node("n1")["metadata"].get("annotations") or {})


def test_helpers_stand_in_for_the_missing_controllers(kube_api: KubeAPI) -> None:
    """What later tests (NetworkPolicy) build on: pods with the status kubelet would report,
    deleted at once, and namespaces that really go away with everything in them."""
    kube = kube_api
    kube.create_node("h1", ["10.244.9.0/24"], internal_ip="192.168.77.99")
    kube.create_namespace("helpers", {"team": "a"})
    try:
        pod = kube.create_pod("helpers", "web", {"app": "web"}, node="h1", ip="10.244.9.5")
        assert pod["status"]["podIP"] == "10.244.9.5" and pod["spec"]["nodeName"] == "h1"
        assert kube.node("h1")["spec"]["podCIDRs"] == ["10.244.9.0/24"]
        kube.delete_pod("helpers", "web")
        assert kube.core.list_namespaced_pod("helpers").items == []
        kube.create_pod("helpers", "db", {"app": "db"}, node="h1", ip="10.244.9.6")
        status, _ = kube.request("POST", "/apis/networking.k8s.io/v1/namespaces/helpers/networkpolicies", {
            "metadata": {"name": "deny"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
        assert status == 201
        kube.delete_namespace("helpers")
        assert kube.request("GET", "/api/v1/namespaces/helpers")[0] == 404
        assert kube.request("GET", "/api/v1/namespaces/helpers/pods/db")[0] == 404
        assert kube.request("GET", "/apis/networking.k8s.io/v1/namespaces/helpers/networkpolicies/deny")[0] == 404
    finally:
        kube.delete_namespace("helpers")
        kube.delete_node("h1")


def test_wireguard_keys_travel_in_node_annotations(kube_api: KubeAPI, make_cluster: MakeCluster,
                                                   weft_token: str) -> None:
    """The wireguard backend on the kube store: each weftd publishes its public key and port in its Node's
    backend-data annotation and takes its peers from the other Nodes'; pods talk through wireguard-go.
    A rotated key reaches the peers through the annotation; a deleted Node's peer goes."""
    kube = kube_api
    with kube_store_cluster(kube, make_cluster, weft_token, "wireguard", PersistentKeepaliveInterval=25) as c:
        nodes = [join(kube, c, f"n{i}", f"10.244.{i}.0/24") for i in (1, 2, 3)]
        n1, n2, n3 = nodes

        def published(cn: ClusterNode) -> dict[str, Any]:
            ann = kube.node(cn.name)["metadata"]["annotations"]
            assert ann[store.ANN_TYPE] == "wireguard" and ann[store.ANN_IP] == cn.ip
            return json.loads(ann[store.ANN_DATA])  # type: ignore[no-any-return]

        def wired(cn: ClusterNode) -> dict[str, tuple[str, str]]:
            """The node's WireGuard peers: public key -> (endpoint, allowed IPs)."""
            return {k: (p["endpoint"], p["allowed_ips"]) for k, p in c.wg_peers(cn).items()}

        def expected(cn: ClusterNode) -> dict[str, tuple[str, str]]:
            return {published(p)["PublicKey"]: (f"{p.ip}:51820", kube.node(p.name)["spec"]["podCIDRs"][0])
                    for p in nodes if p is not cn}

        for cn in nodes:
            data = published(cn)
            assert data["Port"] == 51820 and len(base64.b64decode(data["PublicKey"])) == 32
            c.until(lambda cn=cn: wired(cn) == expected(cn), 60, f"{cn.name}'s peers from the annotations", cn)
        for cn in nodes:
            c.pod(cn, f"pod-{cn.name}")
        all_pods_reach_each_other(c)

        # Key rotation: n3 loses its key file and restarts with a fresh device; the others learn the new
        # key from n3's annotation and drop the old one.
        old = published(n3)["PublicKey"]
        c.stop(n3)
        c.stop_wireguard_go(n3)
        (n3.state_dir / "wireguard.key").unlink()
        c.start(n3)
        c.wait_ready(n3)
        c.until(lambda: published(n3)["PublicKey"] != old, 60, "n3's new key in its annotation", n3)
        for cn in (n1, n2):
            c.until(lambda cn=cn: wired(cn) == expected(cn), 60, f"{cn.name} takes n3's new key", cn)
        assert old not in wired(n1)
        assert ping(n1.pods["pod-n1"][0], n3.pods["pod-n3"][1])
        assert ping(n3.pods["pod-n3"][0], n2.pods["pod-n2"][1])

        # n3 leaves: its Node object goes, and so does its peer everywhere.
        c.stop(n3)
        kube.delete_node("n3")
        nodes.remove(n3)
        for cn in nodes:
            c.until(lambda cn=cn: wired(cn) == expected(cn), 60, f"{cn.name} drops n3's peer", cn)
        assert ping(n1.pods["pod-n1"][0], n2.pods["pod-n2"][1])


@pytest.mark.slow
def test_wireguard_dual_stack_on_the_kube_store(kube_api: KubeAPI, make_cluster: MakeCluster,
                                                weft_token: str) -> None:
    """WireGuard with both families on the kube store (Mode separate): one key, published in both
    backend-data annotations; the IPv6 device's peers come from the other Node's IPv6 annotations
    (endpoint on ListenPortV6, its IPv6 podCIDR); pods reach each other over both families."""
    kube = kube_api
    with kube_store_cluster(kube, make_cluster, weft_token, "wireguard",
                            net={"EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}) as c:
        nodes = [join(kube, c, f"n{i}", f"10.244.{i}.0/24") for i in (1, 2)]

        def annotations(cn: ClusterNode) -> dict[str, str]:
            return kube.node(cn.name)["metadata"]["annotations"]  # type: ignore[no-any-return]

        def v6_peers(cn: ClusterNode) -> dict[str, tuple[str, str]]:
            p = cn.ns.run("wg", "show", f"{cn.wg_device}-v6", "dump", check=False)
            return {line.split("\t")[0]: (line.split("\t")[2], line.split("\t")[3])
                    for line in p.stdout.splitlines()[1:]}

        for cn in nodes:
            ann = annotations(cn)
            v4, v6 = json.loads(ann[store.ANN_DATA]), json.loads(ann[store.ANN_DATA6])
            assert v4["PublicKey"] == v6["PublicKey"] and ann[store.ANN_IP6] == cn.ip6
            assert (v4["Port"], v6["Port"]) == (51820, 51821)
        for cn, peer in ((nodes[0], nodes[1]), (nodes[1], nodes[0])):
            key = json.loads(annotations(peer)[store.ANN_DATA6])["PublicKey"]
            want = {key: (f"[{peer.ip6}]:51821", kube.node(peer.name)["spec"]["podCIDRs"][1])}
            c.until(lambda cn=cn, want=want: v6_peers(cn) == want, 60, f"{cn.name}'s IPv6 peer from the annotations",
                    cn)
        for cn in nodes:
            c.pod(cn, f"pod-{cn.name}")
        for cn, peer in ((nodes[0], nodes[1]), (nodes[1], nodes[0])):
            for ip in peer.pod_ips[f"pod-{peer.name}"]:
                assert ping(cn.pods[f"pod-{cn.name}"][0], ip), f"{cn.name} cannot reach {ip}"


@pytest.fixture
def kube_dual_cluster(kube_api: KubeAPI, make_cluster: MakeCluster, weft_token: str) -> Iterator[Cluster]:
    """As kube_cluster, with IPv6 on: the underlay has both families, the net-conf EnableIPv6."""
    with kube_store_cluster(kube_api, make_cluster, weft_token, "vxlan",
                            net={"EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}) as c:
        yield c


@pytest.mark.slow
def test_kube_store_dual_stack_pod_cidrs(kube_api: KubeAPI, kube_dual_cluster: Cluster) -> None:
    kube, c = kube_api, kube_dual_cluster
    n1 = join(kube, c, "n1", "10.244.1.0/24")  # podCIDRs [10.244.1.0/24, fd00:10:244:1::/64]
    n2 = join(kube, c, "n2", "10.244.2.0/24")
    c.until(lambda: {r["dst"] for r in n1.routes(6)} == {"fd00:10:244:2::/64"}
            and {r["dst"] for r in n2.routes(6)} == {"fd00:10:244:1::/64"} and peer_routes(n1) == {"10.244.2.0/24"},
            60, "IPv4 and IPv6 routes between n1 and n2")
    for cn in (n1, n2):
        ann = kube.node(cn.name)["metadata"]["annotations"]
        assert ann[store.ANN_IP] == cn.ip and ann[store.ANN_IP6] == cn.ip6
        assert json.loads(ann[store.ANN_DATA6]) == {"VNI": 1, "VtepMAC": cn.ns.links()["weft6.1"]["address"]}
        v4, v6 = kube.node(cn.name)["spec"]["podCIDRs"]
        assert cn.state()["WEFT_SUBNET"] == v4.replace(".0/24", ".1/24")
        assert cn.state()["WEFT_IPV6_SUBNET"] == v6.replace("::/64", "::1/64")
    ns1, _ = c.pod(n1, "p1")
    c.pod(n2, "p2")
    for ip in n2.pod_ips["p2"]:
        assert ping(ns1, ip)

    # A node whose IPv6 podCIDR lies outside IPv6Network is refused with the reason, and stays out.
    n3 = c.add_node("n3")
    kube.create_node("n3", ["10.244.3.0/24", "fd00:99:1::/64"], internal_ip=n3.ip)
    c.start(n3)
    c.until(lambda: "pod cidr fd00:99:1::/64 is outside the cluster network fd00:10:244::/56" in n3.log.read_text(),
            60, "n3 refused", n3)
    assert not n3.conflist.exists()
    assert store.ANN_MANAGED not in (kube.node("n3")["metadata"].get("annotations") or {})


@pytest.mark.slow
def test_kube_store_ipv6_only(kube_api: KubeAPI, make_cluster: MakeCluster, weft_token: str) -> None:
    """EnableIPv4 false: the IPv6 podCIDR is the node's subnet (an IPv4 one beside it is ignored), host-gw routes
    it via the peer's IPv6 address, and no IPv4 annotation, route or state is published. The underlay keeps IPv4
    only to reach the test's API server."""
    kube = kube_api
    with kube_store_cluster(kube, make_cluster, weft_token, "host-gw", families=(4, 6),
                            net={"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}) as c:
        n1 = join(kube, c, "n1", "10.244.1.0/24")
        n2 = join(kube, c, "n2", "10.244.2.0/24")
        c.until(lambda: {(r["dst"], r["gateway"]) for r in n1.routes(6)} == {("fd00:10:244:2::/64", n2.ip6)}, 60,
                "n1's IPv6 route to n2")
        assert n1.routes(4) == []
        ann = kube.node("n1")["metadata"]["annotations"]
        assert ann[store.ANN_IP6] == n1.ip6 and store.ANN_IP not in ann
        assert "WEFT_SUBNET" not in n1.state() and n1.state()["WEFT_IPV6_SUBNET"] == "fd00:10:244:1::1/64"
        a, _ = c.pod(n1, "a")
        c.pod(n2, "b")
        assert n2.pod_ips["b"] == ["fd00:10:244:2::2"]
        assert ping(a, "fd00:10:244:2::2")
