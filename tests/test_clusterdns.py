"""The test cluster's DNS (tools/clusterdns, test-bed infrastructure, not part of Weft) against a real kube-apiserver.

tools/clusterdns/clusterdns.yml is created on the server as written; server.py then runs as its pod would:
with the manifest's ServiceAccount token and the cluster's CA at /var/run/secrets/kubernetes.io/serviceaccount
(KubeAPI.as_pod), here inside the API server's network namespace, where the test asks it questions over UDP
and TCP with dnslib's client.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import QTYPE, RCODE, DNSRecord

from tests.containerd import Containerd
from tests.kubeapi import KubeAPI, in_netns
from tests.lab import ROOT

SERVER = ROOT / "tools" / "clusterdns" / "server.py"
MANIFEST = ROOT / "tools" / "clusterdns" / "clusterdns.yml"
IMAGE_SCRIPT = ROOT / "tools" / "clusterdns" / "image.sh"
IMAGE_ARCHIVE = ROOT / ".build" / "images" / "clusterdns.tar"
PORT = 53
HEALTH = 8181
STATIC_GOOGLE = "10.96.0.80"

COLLECTIONS = {"ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
               "Service": "/api/v1/namespaces/{ns}/services",
               "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
               "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
               "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments"}


def manifest() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _collection(doc: dict[str, Any]) -> str:
    return COLLECTIONS[doc["kind"]].format(ns=doc["metadata"].get("namespace", ""))


def create(kube: KubeAPI, doc: dict[str, Any]) -> None:
    status, body = kube.request("POST", _collection(doc), doc)
    assert status == 201, (doc["kind"], doc["metadata"]["name"], body)


def delete(kube: KubeAPI, doc: dict[str, Any]) -> None:
    status, body = kube.request("DELETE", f"{_collection(doc)}/{doc['metadata']['name']}")
    assert status in (200, 202, 404), body


def ask(kube: KubeAPI, name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    return DNSRecord.parse(in_netns(kube.ns.path, lambda: q.send("127.0.0.1", PORT, tcp=tcp, timeout=5)))


def answer(kube: KubeAPI, name: str, qtype: str = "A", tcp: bool = False) -> tuple[str, list[str]]:
    """The reply's rcode and its answers as "TYPE rdata"."""
    r = ask(kube, name, qtype, tcp)
    return str(RCODE[r.header.rcode]), [f"{QTYPE[rr.rtype]} {rr.rdata}" for rr in r.rr]


def eventually(get: Callable[[], Any], want: Any, seconds: float = 10) -> None:
    """A watch delivers within a second or so; 10 s tells that from never."""
    deadline = time.monotonic() + seconds
    got = get()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.1)
        got = get()
    assert got == want


def ready(kube: KubeAPI) -> int:
    def get() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH}/ready", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    return in_netns(kube.ns.path, get)


class DNSProcess:
    def __init__(self, kube: KubeAPI, d: Path) -> None:
        self.kube, self.dir = kube, d
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, token: str) -> None:
        exe = ["env", "KUBERNETES_SERVICE_HOST=127.0.0.1", sys.executable, str(SERVER), "--port", str(PORT),
               "--health-port", str(HEALTH), "--log-queries", "--static", f"google.com={STATIC_GOOGLE}"]
        with open(self.dir / "clusterdns.log", "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.kube.ns.name,
                                          *self.kube.as_pod(exe, token, self.dir / "pod")],
                                         stdout=log, stderr=log, start_new_session=True)
        # up (health answers) within the bound, whether ready or not
        eventually(lambda: ready(self.kube) != 0 or self.proc is None or self.proc.poll() is not None, True, 30)
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        path = self.dir / "clusterdns.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def manifest_applied(kube_api: KubeAPI) -> Iterator[str]:
    """clusterdns.yml created as written; yields a token of its ServiceAccount."""
    created: list[dict[str, Any]] = []
    try:
        for doc in manifest():
            create(kube_api, doc)
            created.append(doc)
        yield kube_api.token("kube-system", "clusterdns")
    finally:
        for doc in reversed(created):
            delete(kube_api, doc)


@pytest.fixture
def cluster_dns(kube_api: KubeAPI, manifest_applied: str, tmp_path: Path) -> Iterator[DNSProcess]:
    """server.py running with the manifest's ServiceAccount token (the Deployment is stored; no kubelet runs it)."""
    p = DNSProcess(kube_api, tmp_path)
    try:
        p.start(manifest_applied)
        eventually(lambda: ready(kube_api), 200)
        yield p
    finally:
        p.stop()


@pytest.fixture
def namespace(kube_api: KubeAPI) -> Iterator[str]:
    name = f"dns-{uuid.uuid4().hex[:8]}"
    kube_api.create_namespace(name)
    try:
        yield name
    finally:
        kube_api.delete_namespace(name)


def test_manifest_serves_the_kubelets_cluster_dns_address(kube_api: KubeAPI, cluster_dns: DNSProcess) -> None:
    svc = kube_api.core.read_namespaced_service("kube-dns", "kube-system")
    assert svc.spec.cluster_ip == "10.96.0.10"
    assert sorted((p.port, p.protocol) for p in svc.spec.ports) == [(53, "TCP"), (53, "UDP")]
    dep = kube_api.request("GET", "/apis/apps/v1/namespaces/kube-system/deployments/kube-dns")[1]
    assert dep["spec"]["template"]["metadata"]["labels"] == svc.spec.selector == {"k8s-app": "kube-dns"}
    for tcp in (False, True):
        assert answer(kube_api, "kube-dns.kube-system.svc.cluster.local", tcp=tcp) == ("NOERROR", ["A 10.96.0.10"])
        assert answer(kube_api, "kubernetes.default.svc.cluster.local", tcp=tcp) == ("NOERROR", ["A 10.96.0.1"])


def test_a_record_follows_the_service(kube_api: KubeAPI, cluster_dns: DNSProcess, namespace: str) -> None:
    name = f"web.{namespace}.svc.cluster.local"
    assert answer(kube_api, name) == ("NXDOMAIN", [])
    svc = kube_api.core.create_namespaced_service(namespace, {
        "metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": "web"}}})
    ip = svc.spec.cluster_ip
    for tcp in (False, True):
        eventually(lambda tcp=tcp: answer(kube_api, name, tcp=tcp), ("NOERROR", [f"A {ip}"]))
    assert answer(kube_api, f"_http._tcp.{name}", "SRV") == ("NOERROR", [f"SRV 0 100 80 {name}."])
    status, body = kube_api.request("DELETE", f"/api/v1/namespaces/{namespace}/services/web")
    assert status == 200, body
    for tcp in (False, True):
        eventually(lambda tcp=tcp: answer(kube_api, name, tcp=tcp), ("NXDOMAIN", []))


def in_pod(kube: KubeAPI, d: Path, namespace: str, *cmd: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`cmd` with the /etc/resolv.conf kubelet writes for a pod of `namespace` (ClusterFirst), in the server's
    network namespace: what it printed, and the time it took."""
    conf = d / f"resolv-{namespace}.conf"
    conf.write_text(f"nameserver 127.0.0.1\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
                    "options ndots:5\n")
    start = time.monotonic()
    p = kube.ns.run("unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"', "sh", str(conf), *cmd,
                    check=False, timeout=60)
    return p, time.monotonic() - start


def getent(kube: KubeAPI, d: Path, namespace: str, name: str) -> tuple[int, str, float]:
    """glibc's resolver: `getent hosts NAME`'s exit code, output and time taken. (`getent ahosts` would ask
    getaddrinfo with AI_ADDRCONFIG, which finds no address but loopback in this namespace and gives up.)"""
    p, took = in_pod(kube, d, namespace, "getent", "hosts", name)
    return p.returncode, p.stdout, took


def test_a_pod_s_resolver_finds_services_by_short_name(kube_api: KubeAPI, cluster_dns: DNSProcess, namespace: str,
                                                       tmp_path: Path) -> None:
    svc = kube_api.core.create_namespaced_service(namespace, {
        "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}})
    eventually(lambda: answer(kube_api, f"web.{namespace}.svc.cluster.local")[0], "NOERROR")
    for name in ("web", f"web.{namespace}", f"web.{namespace}.svc", f"web.{namespace}.svc.cluster.local"):
        code, out, _ = getent(kube_api, tmp_path, namespace, name)
        assert code == 0 and out.split()[0] == svc.spec.cluster_ip, (name, out, cluster_dns.log())
    code, out, _ = getent(kube_api, tmp_path, "default", "kubernetes")
    assert code == 0 and out.split()[0] == "10.96.0.1"
    code, out, _ = getent(kube_api, tmp_path, namespace, "google.com")
    assert code == 0 and out.split()[0] == STATIC_GOOGLE
    # a name nobody has fails at once: glibc waits 5 s per try for a server that does not answer
    code, out, took = getent(kube_api, tmp_path, namespace, "example.org")
    assert code == 2 and out == "" and took < 4


def test_external_name_is_a_cname(kube_api: KubeAPI, cluster_dns: DNSProcess, namespace: str) -> None:
    kube_api.core.create_namespaced_service(namespace, {
        "metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "example.com"}})
    eventually(lambda: answer(kube_api, f"ext.{namespace}.svc.cluster.local"), ("NOERROR", ["CNAME example.com."]))


def test_headless_service_answers_its_ready_endpoints(kube_api: KubeAPI, cluster_dns: DNSProcess,
                                                      namespace: str) -> None:
    name = f"db.{namespace}.svc.cluster.local"
    kube_api.core.create_namespaced_service(namespace, {
        "metadata": {"name": "db"}, "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}})
    eventually(lambda: answer(kube_api, name), ("NOERROR", []))
    # what the endpoints controller would write: one ready address, one not ready
    kube_api.core.create_namespaced_endpoints(namespace, {"metadata": {"name": "db"}, "subsets": [{
        "addresses": [{"ip": "10.244.1.5", "hostname": "db-0"}], "notReadyAddresses": [{"ip": "10.244.2.6"}],
        "ports": [{"port": 5432}]}]})
    eventually(lambda: answer(kube_api, name), ("NOERROR", ["A 10.244.1.5"]))
    assert answer(kube_api, f"db-0.{name}") == ("NOERROR", ["A 10.244.1.5"])
    kube_api.core.patch_namespaced_endpoints("db", namespace, {"subsets": [{
        "addresses": [{"ip": "10.244.1.5"}, {"ip": "10.244.2.6"}], "ports": [{"port": 5432}]}]})
    eventually(lambda: sorted(answer(kube_api, name)[1]), ["A 10.244.1.5", "A 10.244.2.6"])


def test_outside_the_zone_refused_at_once_or_static(kube_api: KubeAPI, cluster_dns: DNSProcess) -> None:
    start = time.monotonic()
    assert answer(kube_api, "example.org") == ("REFUSED", [])
    assert time.monotonic() - start < 2  # no upstream to wait for
    assert answer(kube_api, "google.com", tcp=True) == ("NOERROR", [f"A {STATIC_GOOGLE}"])


def test_not_ready_until_it_may_list(kube_api: KubeAPI, tmp_path: Path) -> None:
    """Without its ClusterRoleBinding the lists are refused: /ready answers 503 and questions SERVFAIL. Once the
    binding is there, it lists, turns ready and answers."""
    docs = manifest()
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    p = DNSProcess(kube_api, tmp_path)
    created: list[dict[str, Any]] = []
    try:
        for doc in docs:
            if doc is not binding:
                create(kube_api, doc)
                created.append(doc)
        p.start(kube_api.token("kube-system", "clusterdns"))
        time.sleep(2)
        assert ready(kube_api) == 503
        assert answer(kube_api, "kubernetes.default.svc.cluster.local") == ("SERVFAIL", [])
        assert "403" in p.log()
        create(kube_api, binding)
        created.append(binding)
        eventually(lambda: ready(kube_api), 200, seconds=30)  # its retries back off up to 10 s
        assert answer(kube_api, "kubernetes.default.svc.cluster.local") == ("NOERROR", ["A 10.96.0.1"])
    finally:
        p.stop()
        for doc in reversed(created):
            delete(kube_api, doc)


def test_image_serves_as_the_manifest_runs_it(kube_api: KubeAPI, manifest_applied: str, tmp_path: Path) -> None:
    """The archive from image.sh (its Debian root filesystem cached by tools/images/lib.sh) imports into containerd
    under the manifest's image name, and runs with its own entrypoint on a read-only root, as the Deployment does."""
    build = subprocess.run(["bash", str(IMAGE_SCRIPT), str(IMAGE_ARCHIVE)], capture_output=True, text=True,
                           timeout=1800)
    assert build.returncode == 0, build.stdout + build.stderr
    image = next(c["image"] for d in manifest() if d["kind"] == "Deployment"
                 for c in d["spec"]["template"]["spec"]["containers"])
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(manifest_applied)
    (sa / "ca.crt").write_bytes((kube_api.pki / "ca.crt").read_bytes())
    (sa / "namespace").write_text("kube-system")
    ctrd = Containerd(kube_api.ns, tmp_path / "containerd", f"weft-dns-{uuid.uuid4().hex[:8]}")
    try:
        ctrd.start()
        ctrd.ctr("images", "import", str(IMAGE_ARCHIVE))
        assert image in ctrd.ctr("images", "ls", "-q").stdout.split()
        # the API server's namespace is the container's (--net-host: runc keeps containerd's)
        ctrd.ctr("run", "-d", "--net-host", "--read-only", "--env", "KUBERNETES_SERVICE_HOST=127.0.0.1",
                 "--env", "KUBERNETES_SERVICE_PORT=6443", "--mount",
                 f"type=bind,src={sa},dst=/var/run/secrets/kubernetes.io/serviceaccount,options=rbind:ro",
                 image, "clusterdns")
        eventually(lambda: ready(kube_api), 200, seconds=60)
        for tcp in (False, True):
            assert answer(kube_api, "kube-dns.kube-system.svc.cluster.local", tcp=tcp) == ("NOERROR",
                                                                                          ["A 10.96.0.10"])
        # PID 1 of its container, it stops on SIGTERM (kubelet's way), not only on SIGKILL
        ctrd.ctr("tasks", "kill", "-s", "TERM", "clusterdns")
        eventually(lambda: " STOPPED" in ctrd.ctr("tasks", "ls").stdout, True)
    finally:
        # the task gone before containerd stops, so its cgroups are empty when they are removed
        ctrd.ctr("tasks", "kill", "-s", "KILL", "clusterdns", check=False)

        def task_gone() -> bool:  # deleting a task succeeds only once it has stopped
            ctrd.ctr("tasks", "delete", "clusterdns", check=False)
            return "clusterdns" not in ctrd.ctr("tasks", "ls", "-q").stdout.split()

        eventually(task_gone, True)
        ctrd.stop()


def test_answers_while_the_api_server_is_down_and_catches_up_after(kube_api: KubeAPI, cluster_dns: DNSProcess,
                                                                  namespace: str) -> None:
    def create_service(name: str) -> str:
        svc = kube_api.core.create_namespaced_service(namespace, {
            "metadata": {"name": name}, "spec": {"ports": [{"port": 80}], "selector": {"app": name}}})
        return str(svc.spec.cluster_ip)

    before = create_service("before")
    eventually(lambda: answer(kube_api, f"before.{namespace}.svc.cluster.local"), ("NOERROR", [f"A {before}"]))
    kube_api.stop_server()
    try:
        assert answer(kube_api, f"before.{namespace}.svc.cluster.local") == ("NOERROR", [f"A {before}"])
        assert ready(kube_api) == 200
    finally:
        kube_api.start()
    after = create_service("after")
    eventually(lambda: answer(kube_api, f"after.{namespace}.svc.cluster.local"), ("NOERROR", [f"A {after}"]),
               seconds=30)


def test_upstream_dns_probes(kube_api: KubeAPI, cluster_dns: DNSProcess, namespace: str, tmp_path: Path) -> None:
    """The questions upstream's `[sig-network] DNS` Conformance tests ask from their probe pods, as they ask them
    (test/e2e/network/dns_common.go, createProbeCommand): `dig +notcp|+tcp +noall +answer +search NAME TYPE` with
    the pod's search path, each needing a non-empty answer; here, also the right one."""
    ns = namespace
    kube_api.core.create_namespaced_service(ns, {"metadata": {"name": "dns-test-service"}, "spec": {
        "clusterIP": "None", "ports": [{"name": "http", "port": 80}], "selector": {"dns-test": "true"}}})
    # the endpoints controller's work for a pod with hostname dns-querier-1 and subdomain dns-test-service
    kube_api.core.create_namespaced_endpoints(ns, {"metadata": {"name": "dns-test-service"}, "subsets": [{
        "addresses": [{"ip": "10.244.1.5", "hostname": "dns-querier-1"}], "ports": [{"name": "http", "port": 80}]}]})
    regular = kube_api.core.create_namespaced_service(ns, {"metadata": {"name": "test-service-2"}, "spec": {
        "ports": [{"name": "http", "port": 80}], "selector": {"dns-test": "true"}}}).spec.cluster_ip
    eventually(lambda: answer(kube_api, f"test-service-2.{ns}.svc.cluster.local")[0], "NOERROR")
    eventually(lambda: answer(kube_api, f"dns-test-service.{ns}.svc.cluster.local")[1], ["A 10.244.1.5"])
    reverse = ".".join(reversed(regular.split("."))) + ".in-addr.arpa."
    head, reg = f"dns-test-service.{ns}.svc", f"test-service-2.{ns}.svc"
    want = {
        ("kubernetes.default", "A"): "10.96.0.1",
        ("kubernetes.default.svc", "A"): "10.96.0.1",
        ("kubernetes.default.svc.cluster.local", "A"): "10.96.0.1",
        ("dns-test-service", "A"): "10.244.1.5",
        (f"dns-test-service.{ns}", "A"): "10.244.1.5",
        (f"dns-test-service.{ns}.svc", "A"): "10.244.1.5",
        (f"_http._tcp.{head}", "SRV"): f"0 100 80 dns-querier-1.{head}.cluster.local.",
        (f"_http._tcp.{reg}", "SRV"): f"0 100 80 {reg}.cluster.local.",
        (f"_http._tcp.{reg}.cluster.local", "SRV"): f"0 100 80 {reg}.cluster.local.",
        (f"dns-querier-1.dns-test-service.{ns}.svc.cluster.local", "A"): "10.244.1.5",
        (f"10-244-1-9.{ns}.pod.cluster.local", "A"): "10.244.1.9",
        (reverse, "PTR"): f"test-service-2.{ns}.svc.cluster.local.",
    }
    for (name, qtype), rdata in want.items():
        for transport in ("+notcp", "+tcp"):
            p, _ = in_pod(kube_api, tmp_path, ns, "dig", transport, "+noall", "+answer", "+search", name, qtype)
            got = [line.split(None, 4)[4] for line in p.stdout.splitlines() if line.strip()]
            assert got == [rdata], (name, qtype, transport, p.stdout, p.stderr)
