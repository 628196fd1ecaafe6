"""A real Kubernetes API server for the tests: Debian's etcd and kube-apiserver in a network namespace.

No controller-manager, scheduler or kubelet runs, so tests do their work themselves: they create
Node objects with podCIDRs (`create_node`), delete pods with a grace period of 0 (`delete_pod`),
and finalize the namespaces they delete (`delete_namespace`). Service-account tokens come from the
TokenRequest API (`token`), since no token controller writes Secrets.

The server listens on 6443 in its own namespace. The test process reaches it through sockets opened
inside that namespace (`admin`, a kubernetes ApiClient with a system:masters certificate); simulated
nodes reach it across a cluster's underlay once `attach` has linked the namespace to it, at KUBE_IP.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import urllib3
import yaml
from kubernetes import client
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool

from tests.lab import ROOT, SOCKET_DIR, Lab, Netns

KUBE_IP = "192.168.77.3"
PORT = 6443
ETCD_URL = "http://127.0.0.1:2379"
ISSUER = "https://kubernetes.default.svc.cluster.local"
BINARY_LINK = ROOT / ".build" / "kube" / "current" / "kube-apiserver"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def binary() -> Path:
    """The kube-apiserver from `make kube-apiserver`, or the one WEFT_KUBE_APISERVER names."""
    path = Path(os.environ.get("WEFT_KUBE_APISERVER") or BINARY_LINK)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"no kube-apiserver at {path}: run `make kube-apiserver`")
    return path


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Runs `fn` on a thread that has entered the network namespace at `path`: what it creates
    (sockets) lives there, and no other thread of the process changes namespace."""
    out: list[Any] = []
    libc = ctypes.CDLL(None, use_errno=True)

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {path}")
            finally:
                os.close(fd)
            out.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            out.append((False, e))

    t = threading.Thread(target=run, name="netns-connect")
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _netns_pool(path: str) -> type[HTTPSConnectionPool]:
    class Conn(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return in_netns(path, super()._new_conn)

    class Pool(HTTPSConnectionPool):
        ConnectionCls = Conn  # type: ignore[assignment]

    return Pool


# P-256 keys: a cluster needs a dozen, and RSA's take seconds each on a loaded machine.
EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path, ips: tuple[str, ...] = (KUBE_IP,), clients: dict[str, str] | None = None) -> None:
    """A CA, the server's certificate (for `ips`, loopback and the first service address), an admin
    client certificate, the service-account key pair, and a client certificate `<name>.crt` for each
    of `clients` (name -> subject)."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *EC, "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=weft-test-ca", cwd=d)
    san = ("subjectAltName=" + ",".join(f"IP:{ip}" for ip in (*ips, "127.0.0.1", "10.96.0.1"))
           + ",DNS:kubernetes,DNS:kubernetes.default,DNS:localhost")
    certs = {"server": ("/CN=kube-apiserver", True), "admin": ("/O=system:masters/CN=weft-admin", False),
             **{name: (subject, False) for name, subject in (clients or {}).items()}}
    for name, (subj, server) in certs.items():
        _openssl("req", *EC, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subj, cwd=d)
        (d / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            + (f"extendedKeyUsage=serverAuth\n{san}\n" if server else "extendedKeyUsage=clientAuth\n"))
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=d)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def etcd_command(name: str, data_dir: Path) -> list[str]:
    """A single-member etcd serving clients on ETCD_URL (loopback of its namespace)."""
    return ["etcd", "--name", name, "--data-dir", str(data_dir), "--listen-client-urls", ETCD_URL,
            "--advertise-client-urls", ETCD_URL, "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380", "--initial-cluster", f"{name}=http://127.0.0.1:2380"]


def apiserver_command(exe: Path, pki: Path, advertise: str, service_range: str, *extra: str) -> list[str]:
    """kube-apiserver on ETCD_URL's etcd, serving PORT on every address with `make_pki`'s certificates."""
    return [str(exe), "--etcd-servers", ETCD_URL, "--bind-address", "0.0.0.0", "--secure-port", str(PORT),
            "--advertise-address", advertise,
            "--tls-cert-file", str(pki / "server.crt"), "--tls-private-key-file", str(pki / "server.key"),
            "--client-ca-file", str(pki / "ca.crt"), "--authorization-mode", "Node,RBAC",
            "--service-account-issuer", ISSUER, "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-account-key-file", str(pki / "sa.pub"), "--service-cluster-ip-range", service_range,
            "--allow-privileged=true", "--profiling=false", *extra]


def write_kubeconfig(path: Path, server: str, ca: Path, user: dict[str, str]) -> Path:
    """A kubeconfig of one cluster, user and context; `user`: a token, or a client-certificate and key."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "weft",
        "clusters": [{"name": "weft", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "weft", "user": user}],
        "contexts": [{"name": "weft", "context": {"cluster": "weft", "user": "weft"}}]}))
    return path


class KubeAPI:
    """etcd and kube-apiserver in namespace `ns`, with their files under `dir`."""

    def __init__(self, lab: Lab, exe: Path | None = None) -> None:
        self.lab = lab
        self.exe = exe or binary()
        self.dir = lab.base / "kube"
        self.pki = self.dir / "pki"
        self.audit_log = self.dir / "audit.log"
        self.ns: Netns = lab.netns("kube")
        self.ns.run("ip", "link", "set", "lo", "up")
        self.etcd: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self._admin: client.ApiClient | None = None
        make_pki(self.pki)
        (self.dir / "audit-policy.yaml").write_text(yaml.safe_dump(
            {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
             "rules": [{"level": "Metadata"}]}))

    # --- processes

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with open(self.dir / f"{name}.log", "ab") as log:
            return subprocess.Popen(["ip", "netns", "exec", self.ns.name, *cmd], stdout=log, stderr=log,
                                    start_new_session=True)

    def start(self) -> None:
        if self.etcd is None:
            self.etcd = self._spawn("etcd", etcd_command("kube", self.dir / "etcd"))
        self.server = self._spawn("kube-apiserver", apiserver_command(
            self.exe, self.pki, KUBE_IP, "10.96.0.0/16",
            # 1.20 keeps only a Node's first podCIDR unless dual stack is on (beta, on by default, from 1.21).
            "--feature-gates", "IPv6DualStack=true",
            # No token controller: the ServiceAccount admission plugin would refuse every pod.
            "--disable-admission-plugins", "ServiceAccount",
            "--audit-policy-file", str(self.dir / "audit-policy.yaml"), "--audit-log-path", str(self.audit_log),
            "--audit-log-mode", "blocking", "--v", "1"))
        self.wait_ready()

    def wait_ready(self, timeout: float = 300) -> None:  # a loaded machine can take minutes
        deadline = time.monotonic() + timeout
        err: Exception | None = None
        while time.monotonic() < deadline:
            for name, proc in (("etcd", self.etcd), ("kube-apiserver", self.server)):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}: {self.log_tail(name)}")
            try:
                pm = self.admin.rest_client.pool_manager
                if pm.request("GET", f"{self.admin.configuration.host}/readyz", timeout=5, retries=False).status == 200:
                    return
            except Exception as e:  # noqa: BLE001 - not listening yet
                err = e
            time.sleep(0.3)
        raise RuntimeError(f"kube-apiserver not ready after {timeout}s ({err}): {self.log_tail('kube-apiserver')}")

    def log_tail(self, name: str, n: int = 3000) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(10)
            self.server = None
        if self._admin is not None:
            self._admin.rest_client.pool_manager.clear()

    def restart_server(self) -> None:
        self.stop_server()
        self.start()

    def close(self) -> None:
        self.stop_server()
        if self.etcd is not None:
            self.etcd.terminate()
            try:
                self.etcd.wait(20)
            except subprocess.TimeoutExpired:
                self.etcd.kill()
                self.etcd.wait(10)
            self.etcd = None

    # --- clients

    def client_config(self, host: str = f"https://127.0.0.1:{PORT}", token: str | None = None) -> client.Configuration:
        cfg = client.Configuration()
        cfg.host = host
        cfg.ssl_ca_cert = str(self.pki / "ca.crt")
        if token:
            cfg.api_key = {"authorization": f"Bearer {token}"}
        else:
            cfg.cert_file, cfg.key_file = str(self.pki / "admin.crt"), str(self.pki / "admin.key")
        return cfg

    def api_client(self, token: str | None = None) -> client.ApiClient:
        """An ApiClient for the test process: its connections are opened inside the server's namespace."""
        api = client.ApiClient(self.client_config(token=token))
        pm: urllib3.PoolManager = api.rest_client.pool_manager
        pm.pool_classes_by_scheme = {**pm.pool_classes_by_scheme, "https": _netns_pool(self.ns.path)}
        return api

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A raw request as admin: the body goes to the server as written, without the client's models."""
        r = self.admin.rest_client.pool_manager.request(
            method, self.admin.configuration.host + path, body=None if body is None else json.dumps(body),
            headers={"Content-Type": "application/json", "Accept": "application/json"}, retries=False, timeout=30)
        return r.status, json.loads(r.data or b"null")

    @property
    def admin(self) -> client.ApiClient:
        if self._admin is None:
            self._admin = self.api_client()
        return self._admin

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.admin)

    @property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        return client.RbacAuthorizationV1Api(self.admin)

    def kubeconfig(self, path: Path, token: str | None = None, server: str = f"https://{KUBE_IP}:{PORT}") -> Path:
        """A kubeconfig for a simulated node: a ServiceAccount token, or the admin certificate."""
        user: dict[str, str] = ({"token": token} if token else
                                {"client-certificate": str(self.pki / "admin.crt"),
                                 "client-key": str(self.pki / "admin.key")})
        return write_kubeconfig(path, server, self.pki / "ca.crt", user)

    def attach(self, underlay: Netns, bridge: str = "br0", ifname: str = "kube0") -> None:
        """Links the server's namespace to a cluster's underlay bridge, at KUBE_IP. The link goes
        away with the underlay namespace; a stale one from an earlier cluster is replaced."""
        self.ns.run("ip", "link", "del", ifname, check=False)
        port = f"k{os.getpid() % 100000}"
        self.ns.run("ip", "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", underlay.name)
        underlay.run("ip", "link", "set", port, "master", bridge, "up")
        self.ns.run("ip", "addr", "add", f"{KUBE_IP}/24", "dev", ifname)
        self.ns.run("ip", "link", "set", ifname, "up")

    # --- what the missing controllers and kubelet would do

    def token(self, namespace: str, service_account: str, seconds: int = 3600) -> str:
        """A bound token for a ServiceAccount, through the TokenRequest API."""
        req = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[],
                                                                                 expiration_seconds=seconds))
        return str(self.core.create_namespaced_service_account_token(service_account, namespace, req).status.token)

    def as_pod(self, exe: list[str], token: str, d: Path) -> list[str]:
        """`exe` wrapped to run with the credentials kubelet gives a pod: KUBERNETES_SERVICE_HOST and _PORT,
        and the ServiceAccount's token, the cluster's CA and the namespace where the client looks for them,
        /var/run/secrets/kubernetes.io/serviceaccount. They are mounted in a mount namespace of the
        command's own, on a tmpfs over /run, so the machine's /run is untouched; the tests' CNI socket
        directory is bound back into it."""
        sa = d / "serviceaccount"
        keep = d / "run-weft-tests"
        sa.mkdir(parents=True)
        keep.mkdir()
        (sa / "token").write_text(token)
        (sa / "ca.crt").write_bytes((self.pki / "ca.crt").read_bytes())
        (sa / "namespace").write_text("kube-weft")
        sockets, keep_, sa_ = (shlex.quote(str(p)) for p in (SOCKET_DIR, keep, sa))
        mount = "/run/secrets/kubernetes.io/serviceaccount"
        script = (f"mkdir -p {sockets} && mount --bind {sockets} {keep_} && mount -t tmpfs weft-pod /run && "
                  f"mkdir -p {sockets} {mount} && mount --bind {keep_} {sockets} && "
                  f'mount --bind {sa_} {mount} && exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "env", f"KUBERNETES_SERVICE_HOST={KUBE_IP}",
                f"KUBERNETES_SERVICE_PORT={PORT}", "sh", "-c", script, "sh", *exe]

    def create_node(self, name: str, pod_cidrs: list[str], internal_ip: str | None = None) -> dict[str, Any]:
        """A Node as kubelet registers it and the controller-manager gives it podCIDRs."""
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
                "spec": {"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs}}
        self.core.create_node(body)
        if internal_ip:
            self.core.patch_node_status(name, {"status": {"addresses": [{"type": "InternalIP",
                                                                          "address": internal_ip}]}})
        return self.node(name)

    def node(self, name: str) -> dict[str, Any]:
        return self.admin.sanitize_for_serialization(self.core.read_node(name))  # type: ignore[no-any-return]

    def delete_node(self, name: str) -> None:
        self._ignore_404(lambda: self.core.delete_node(name, grace_period_seconds=0))

    def delete_all_nodes(self) -> None:
        for n in self.core.list_node().items:
            self.delete_node(n.metadata.name)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})

    def create_pod(self, namespace: str, name: str, labels: dict[str, str] | None = None,
                   node: str | None = None, ip: str | None = None) -> dict[str, Any]:
        """A pod object; with `ip`, also the status kubelet would report once its sandbox runs."""
        spec: dict[str, Any] = {"containers": [{"name": "c", "image": "weft.invalid/none"}],
                                "automountServiceAccountToken": False}
        if node:
            spec["nodeName"] = node
        self.core.create_namespaced_pod(namespace, {"metadata": {"name": name, "labels": labels or {}},
                                                    "spec": spec})
        if ip:
            self.core.patch_namespaced_pod_status(name, namespace, {"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
        return self.admin.sanitize_for_serialization(  # type: ignore[no-any-return]
            self.core.read_namespaced_pod(name, namespace))

    def delete_pod(self, namespace: str, name: str) -> None:
        """Grace period 0: no kubelet would ever confirm a graceful deletion."""
        self._ignore_404(lambda: self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0))

    def namespaced_collections(self) -> list[str]:
        """Every namespaced resource the server serves that can be deleted as a collection, as the
        namespace controller finds them: "<api prefix>/namespaces/{ns}/<plural>"."""
        prefixes = ["/api/v1"]
        _, groups = self.request("GET", "/apis")
        prefixes += [f"/apis/{g['preferredVersion']['groupVersion']}" for g in groups["groups"]]
        out = []
        for prefix in prefixes:
            _, res = self.request("GET", prefix)
            out += [f"{prefix}/namespaces/{{ns}}/{r['name']}" for r in res["resources"]
                    if r["namespaced"] and "/" not in r["name"] and "deletecollection" in r["verbs"]]
        return out

    def delete_namespace(self, name: str) -> None:
        """What the namespace controller does: deletes everything in it (pods with grace period 0),
        then the namespace, then removes its finalizer so it goes away."""
        status, _ = self.request("GET", f"/api/v1/namespaces/{name}")
        if status == 404:
            return
        for collection in self.namespaced_collections():
            status, body = self.request("DELETE", collection.format(ns=name) + "?gracePeriodSeconds=0")
            assert status in (200, 404, 405), (collection, status, body)
        self.request("DELETE", f"/api/v1/namespaces/{name}")
        status, ns = self.request("GET", f"/api/v1/namespaces/{name}")
        if status == 200:
            ns["spec"]["finalizers"] = []
            status, body = self.request("PUT", f"/api/v1/namespaces/{name}/finalize", ns)
            assert status == 200, body
        status, _ = self.request("GET", f"/api/v1/namespaces/{name}")
        assert status == 404, f"namespace {name} still there"

    @staticmethod
    def _ignore_404(call: Callable[[], Any]) -> None:
        try:
            call()
        except client.ApiException as e:
            if e.status != 404:
                raise

    def audit(self) -> Iterator[dict[str, Any]]:
        """The audit log's events (level Metadata: who did what to which resource, and the answer)."""
        if self.audit_log.exists():
            for line in self.audit_log.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)
