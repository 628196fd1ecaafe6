"""Life of a cluster (issue 21): pod networking while Weft, kubelet, containerd and the API server restart, and
when a Node goes away, on a real two-node cluster (tests/k8s) with Weft from conf/kube-weft.yml.

The cluster is booted once for the module; the tests run in order, and the last one deletes the worker's Node.
TCP streams run between a pod on each node: the test process opens their sockets inside the pods' network
namespaces (found through containerd's task of each pod's container), so a stream needs neither the API server
nor `kubectl exec`, and every reset or stall of it is seen.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.containerd import cri_config
from tests.k8s.cluster import WEFT_DAEMONSET, Cluster, stop
from tests.k8s.control import kubeconfig
from tests.k8s.layout import KUBE_BIN, image_selection, missing_binaries
from tests.k8s.node import KubeNode
from tests.kubeapi import in_netns
from tests.lab import ROOT
from tests.test_k8s_smoke import Booted, server
from weftd.subnet.kube import ANN_DATA, ANN_IP

pytestmark = [pytest.mark.slow, pytest.mark.long]

CONTROL, WORKER = "weft-control-plane", "weft-worker"
BRIDGE = "cni0"  # weftd's --bridge
IPAM_DIR = "/var/lib/cni/networks/weft"  # the manifest's WEFTD_IPAM_DATA_DIR / weftd's network name
STREAM_PORT = 5001
HTTP_PORT = 8080  # tests.test_k8s_smoke.server's
CHUNK = 16 * 1024
# A stream that moves no data for this long has stopped: a loaded machine delays an echo by a second or two, a
# lost route or FDB entry stops it until the connection times out (minutes).
STALL = 10.0


@dataclass
class Stream:
    """One TCP connection from a socket in `client_ns` to one in `server_ns` (pod network namespaces), carrying
    numbered chunks that the server end echoes, until stop(). Blocking sockets: a broken path shows as a growing
    gap, a reset as an error."""

    server_ns: str
    client_ns: str
    server_ip: str
    port: int = STREAM_PORT
    rounds: int = 0
    errors: list[str] = field(default_factory=list)
    last: float = 0.0
    max_gap: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _socks: list[socket.socket] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Stream:
        listener = in_netns(self.server_ns, lambda: socket.create_server(("", self.port)))
        client = in_netns(self.client_ns, lambda: socket.create_connection((self.server_ip, self.port), timeout=10))
        client.settimeout(None)
        conn, _ = listener.accept()
        listener.close()
        self._socks += [client, conn]
        self.last = time.monotonic()
        for target, sock in ((self._echo, conn), (self._pump, client)):
            t = threading.Thread(target=target, args=(sock,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _fail(self, side: str, e: BaseException | str) -> None:
        if not self._stop.is_set():
            self.errors.append(f"{side}: {e if isinstance(e, str) else f'{type(e).__name__}: {e}'}")

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            self._fail("server", "the client closed the connection")
        except OSError as e:
            self._fail("server", e)

    def _pump(self, client: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                payload = self.rounds.to_bytes(8, "big") * (CHUNK // 8)
                client.sendall(payload)
                got = bytearray()
                while len(got) < CHUNK:
                    data = client.recv(CHUNK - len(got))
                    if not data:
                        raise ConnectionError("the server closed the connection")
                    got += data
                if got != payload:
                    raise ValueError(f"round {self.rounds}: the echo differs from what was sent")
                now = time.monotonic()
                with self._lock:
                    self.max_gap = max(self.max_gap, now - self.last)
                    self.last, self.rounds = now, self.rounds + 1
                self._stop.wait(0.02)
        except (OSError, ValueError) as e:
            self._fail("client", e)

    def gap(self) -> float:
        """The longest time without an echoed chunk so far, the current wait included."""
        with self._lock:
            return max(self.max_gap, time.monotonic() - self.last)

    def check(self, what: str) -> None:
        assert not self.errors, f"the stream broke during {what}: {self.errors}"
        assert self.gap() < STALL, f"the stream stalled for {self.gap():.1f}s during {what} ({self.rounds} rounds)"

    def stop(self) -> None:
        self._stop.set()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(10)


def http_get(netns: str, ip: str, port: int = HTTP_PORT, timeout: float = 3) -> str | None:
    """The body a new connection from `netns` gets for GET / (tests.test_k8s_smoke.server serves its pod's name),
    None when there is no answer within `timeout`."""
    def get() -> str | None:
        try:
            with socket.create_connection((ip, port), timeout=timeout) as s:
                s.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
                reply = b""
                while data := s.recv(65536):
                    reply += data
        except OSError:
            return None
        head, _, body = reply.partition(b"\r\n\r\n")
        return body.decode().strip() if head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0] else None

    return in_netns(netns, get)


@dataclass
class Life(Booted):
    def node(self, name: str) -> KubeNode:
        return self.cluster.node(name)

    def netns(self, pod: str) -> str:
        """The network namespace of `pod`, as /proc/<pid>/ns/net of its first container's task."""
        p = self.pod(pod)
        cid = p["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        tasks = self.node(p["spec"]["nodeName"]).run("ctr", "-n", "k8s.io", "tasks", "ls").stdout
        pid = next(line.split()[1] for line in tasks.splitlines()[1:] if line.split()[0] == cid)
        return f"/proc/{pid}/ns/net"

    def ip(self, pod: str) -> str:
        ip: str = self.pod(pod)["status"]["podIP"]
        return ip

    def stream(self, client: str, to: str) -> Stream:
        return Stream(self.netns(to), self.netns(client), self.ip(to)).start()

    def pods_on(self, node: str) -> list[dict[str, Any]]:
        """The node's pods on the pod network that are not finished."""
        items = json.loads(self.kubectl("get", "pods", "-A", "-o", "json",
                                        f"--field-selector=spec.nodeName={node}").stdout)["items"]
        return [p for p in items if not p["spec"].get("hostNetwork")
                and p["status"].get("phase") not in ("Succeeded", "Failed")]

    def weft_pods(self) -> dict[str, dict[str, Any]]:
        """The weft DaemonSet's pods by node."""
        items = json.loads(self.kubectl("-n", "kube-weft", "get", "pods", "-l", "app=weft", "-o", "json").stdout)
        return {p["spec"]["nodeName"]: p for p in items["items"]}

    def daemon(self, node: str, daemon: str) -> dict[str, Any]:
        """The recorded process entry of a node's daemon that runs now."""
        name = f"{node}/{daemon}"
        return next(e for e in self.layout.record.alive() if e["name"] == name)

    def stop_daemon(self, node: str, daemon: str) -> list[str]:
        """Stops a node's daemon by its recorded PID (SIGTERM, SIGKILL after 15 s); returns its command line."""
        entry = self.daemon(node, daemon)
        cmdline = Path(f"/proc/{entry['pid']}/cmdline").read_bytes().decode().split("\0")[:-1]
        stop([entry])
        assert entry not in self.layout.record.alive()
        return cmdline

    def attachments(self, node: str) -> tuple[dict[str, str], list[str]]:
        """The node's IPAM reservations (address -> container ID) and the veths on its pod bridge."""
        n = self.node(node)
        listing = n.run("sh", "-c", f"cd {IPAM_DIR} && for f in *; do echo \"$f $(head -n1 $f)\"; done")
        reservations = {}
        for line in listing.stdout.splitlines():
            name, _, owner = line.partition(" ")
            try:
                ipaddress.ip_address(name)
            except ValueError:
                continue  # lock, last_reserved_ip.0
            reservations[name] = owner.strip()
        links = json.loads(n.run("ip", "-j", "link", "show", "master", BRIDGE).stdout or "[]")
        return reservations, sorted(link["ifname"] for link in links)

    def attachment_mismatch(self, node: str) -> str | None:
        """None when every pod of the node on the pod network holds one reservation (its address, owned by a
        sandbox that runs) and one veth on the bridge, and nothing else does; else what differs."""
        reservations, veths = self.attachments(node)
        pods = self.pods_on(node)
        ips = sorted(str(p["status"].get("podIP")) for p in pods)
        if sorted(reservations) != ips:
            return f"{node}: reservations {reservations}, pods' addresses {ips}"
        tasks = {line.split()[0] for line in self.node(node).run("ctr", "-n", "k8s.io", "tasks", "ls").stdout
                 .splitlines()[1:] if line.split()[2:3] == ["RUNNING"]}
        dead = {ip: owner for ip, owner in reservations.items() if owner not in tasks}
        if dead:
            return f"{node}: reservations owned by no running sandbox: {dead}"
        if len(veths) != len(pods):
            return f"{node}: veths on {BRIDGE} {veths}, pods {[p['metadata']['name'] for p in pods]}"
        return None

    def check_attachments(self, node: str) -> None:
        mismatch = self.attachment_mismatch(node)
        assert mismatch is None, mismatch

    def wait_pods(self, names: list[str], timeout: int = 240) -> None:
        if names:
            self.kubectl("wait", "--for=condition=Ready", *(f"pod/{n}" for n in names), f"--timeout={timeout}s",
                         timeout=timeout + 30)

    def sandbox_failures(self, names: list[str]) -> list[str]:
        events = json.loads(self.kubectl("get", "events", "-o", "json").stdout)["items"]
        return [f"{e['involvedObject']['name']}: {e['reason']}: {e.get('message', '')}" for e in events
                if e["involvedObject"].get("name") in names and e["type"] == "Warning"]

    def until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s: {what}\n{self.cluster.describe()}"
            time.sleep(1)


def sleeper(name: str, node: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"life": "churn"}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "c", "image": "docker.io/library/busybox:1.29",
                                     "command": ["sleep", "36000"]}]}}


def heartbeat(life: Life, node: str) -> datetime:
    """When the node's kubelet last reported its Ready condition."""
    obj = json.loads(life.kubectl("get", "node", node, "-o", "json").stdout)
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    return datetime.strptime(ready["lastHeartbeatTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def subnet_of(life: Life, node: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(json.loads(life.kubectl("get", "node", node, "-o", "json").stdout)["spec"]["podCIDR"])


@pytest.fixture(scope="module")
def life() -> Iterator[Life]:
    missing = missing_binaries()
    if missing:
        pytest.fail(f"no {', '.join(missing)} in {KUBE_BIN}: run `make kube kubectl image test-images`")
    # Under .build, as the smoke test's: pytest removes old directories under its own temporary root, also
    # while another run's cluster lives in one.
    directory = ROOT / ".build" / "cluster-life"
    cluster = Cluster(directory)
    cluster.down()  # what an earlier run left, if it was killed
    images = image_selection(ROOT / ".build" / "cluster-life-images")
    up = subprocess.run([sys.executable, "-m", "tests.k8s", "--dir", str(directory), "up", "--nodes", "2",
                         "--images", str(images)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    try:
        assert up.returncode == 0, f"up failed:\n{up.stdout}{up.stderr}"
        booted = Life(cluster, {}, set())
        # life-a on the control-plane node, life-b on the worker: the two ends of every stream, and HTTP servers.
        booted.apply(server("life-a", CONTROL), server("life-b", WORKER))
        booted.wait_pods(["life-a", "life-b"])
        yield booted
    finally:
        cluster.down()


def test_weft_rollout_restart_keeps_streams_and_pod_creation(life: Life) -> None:
    """`kubectl rollout restart` of the weft DaemonSet while a TCP stream runs between pods on both nodes and pods
    are being created on both: the stream never resets or stops, every pod is created without a failed sandbox
    and runs with an address of its node's subnet, and every node runs a new weftd."""
    before = {node: p["metadata"]["uid"] for node, p in life.weft_pods().items()}
    assert sorted(before) == [CONTROL, WORKER]
    stream = life.stream("life-b", "life-a")
    created: list[str] = []
    creating = threading.Event()
    creating.set()
    create_errors: list[str] = []

    def create() -> None:
        while creating.is_set() or len(created) < 6:
            name = f"churn-{len(created)}"
            p = life.kubectl("apply", "-f", "-", input=json.dumps(sleeper(name, (CONTROL, WORKER)[len(created) % 2])),
                             check=False)
            if p.returncode != 0:
                create_errors.append(p.stderr)
            created.append(name)
            time.sleep(2)

    maker = threading.Thread(target=create)
    try:
        life.kubectl("-n", "kube-weft", "rollout", "restart", WEFT_DAEMONSET)
        maker.start()
        life.cluster.wait_rollout("kube-weft", WEFT_DAEMONSET)
        creating.clear()
        maker.join()
        time.sleep(5)  # the stream runs on after the rollout
        stream.check("the rollout")
        rounds = stream.rounds
        assert rounds > 0
    finally:
        creating.clear()
        if maker.is_alive():
            maker.join()
        stream.stop()
    after = life.weft_pods()
    assert all(after[n]["metadata"]["uid"] != before[n] for n in before), "a node kept its old weftd"
    assert not create_errors, create_errors
    life.wait_pods(created)
    failures = life.sandbox_failures(created)
    assert not failures, failures
    seen: dict[str, str] = {}
    for name in created:
        pod = life.pod(name)
        ip, node = pod["status"].get("podIP"), pod["spec"]["nodeName"]
        assert ip and ipaddress.ip_address(ip) in subnet_of(life, node), (name, node, ip)
        assert ip not in seen, f"{name} and {seen[ip]} share {ip}"
        seen[ip] = name
    for node in (CONTROL, WORKER):
        life.check_attachments(node)
    print(f"rollout: {len(created)} pods created during it, stream {rounds} rounds, longest gap {stream.max_gap:.2f}s")


def test_kubelet_and_containerd_restart_keep_pods(life: Life) -> None:
    """kubelet and containerd of the worker stopped and started again: its pods keep their sandboxes, addresses
    and connectivity (a stream through the restart never breaks), and its reservations and veths still match its
    pods one to one, also after a pod is added and one deleted."""
    node = life.node(WORKER)
    pods = {p["metadata"]["name"]: p for p in life.pods_on(WORKER)}
    assert "life-b" in pods and len(pods) > 1
    life.check_attachments(WORKER)
    stream = life.stream("life-b", "life-a")
    try:
        life.stop_daemon(WORKER, "kubelet")
        life.stop_daemon(WORKER, "containerd")
        node.start_containerd(life.layout.record, cri_config())
        restarted = datetime.now(UTC).replace(microsecond=0)
        node.start_kubelet(life.layout.record, kubeconfig(life.layout, WORKER), life.layout.pki / "ca.crt")
        life.until(lambda: heartbeat(life, WORKER) > restarted, 120, "a node status from the new kubelet")
        time.sleep(20)  # kubelet's first pod syncs after its restart: a sandbox it found broken would be replaced
        stream.check("the restart")
    finally:
        stream.stop()
    print(f"kubelet+containerd restart: {len(pods)} pods on {WORKER}, stream {stream.rounds} rounds, "
          f"longest gap {stream.max_gap:.2f}s")
    after = {p["metadata"]["name"]: p for p in life.pods_on(WORKER)}
    assert sorted(after) == sorted(pods)
    for name, p in pods.items():
        a = after[name]
        assert a["status"]["podIP"] == p["status"]["podIP"], name
        assert [c["restartCount"] for c in a["status"]["containerStatuses"]] == \
               [c["restartCount"] for c in p["status"]["containerStatuses"]], f"{name}'s containers restarted"
    life.check_attachments(WORKER)
    assert http_get(life.netns("life-a"), life.ip("life-b")) == "life-b"
    life.apply(server("life-c", WORKER))
    life.wait_pods(["life-c"])
    assert http_get(life.netns("life-a"), life.ip("life-c")) == "life-c"
    # A grace period of 0: the API forgets the pod at once, and kubelet tears it down after.
    life.kubectl("delete", "pod", "churn-1", "--wait=true", "--timeout=60s", timeout=90)
    deadline = time.monotonic() + 60
    while (mismatch := life.attachment_mismatch(WORKER)) is not None and time.monotonic() < deadline:
        time.sleep(1)
    assert mismatch is None, f"60 s after churn-1 was deleted: {mismatch}"


def test_apiserver_down_60s(life: Life) -> None:
    """The API server stopped for 60 s: the stream between the nodes and new connections keep flowing; once it
    is back, weftd networks a new pod and enforces a NetworkPolicy made then, and was never restarted."""
    control = life.node(CONTROL)
    restarts = {n: p["status"]["containerStatuses"][0]["restartCount"] for n, p in life.weft_pods().items()}
    a_ns, b_ns, a_ip = life.netns("life-a"), life.netns("life-b"), life.ip("life-a")
    stream = life.stream("life-b", "life-a")
    fetched: list[str | None] = []
    try:
        cmdline = life.stop_daemon(CONTROL, "kube-apiserver")
        assert life.kubectl("get", "--raw", "/readyz", check=False, timeout=20).returncode != 0
        down = time.monotonic()
        while time.monotonic() - down < 60:
            fetched.append(http_get(b_ns, a_ip))
            stream.check(f"the outage, {time.monotonic() - down:.0f}s in")
            time.sleep(5)
        control.spawn(life.layout.record, "kube-apiserver", *cmdline)
        life.cluster.wait_apiserver()
        stream.check("the outage")
    finally:
        stream.stop()
    assert fetched and all(f == "life-a" for f in fetched), f"new connections during the outage: {fetched}"
    print(f"apiserver down 60 s: stream {stream.rounds} rounds, longest gap {stream.max_gap:.2f}s, "
          f"{len(fetched)} new connections answered")
    life.apply(server("life-d", WORKER))
    life.wait_pods(["life-d"])
    d_ip = life.ip("life-d")
    assert http_get(a_ns, d_ip) == "life-d"
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "deny-d"},
              "spec": {"podSelector": {"matchLabels": {"app": "life-d"}}, "policyTypes": ["Ingress"]}}
    life.apply(policy)
    life.until(lambda: http_get(a_ns, d_ip) is None, 60, "the NetworkPolicy made after the outage denies")
    life.kubectl("delete", "networkpolicy", "deny-d")
    life.until(lambda: http_get(a_ns, d_ip) == "life-d", 60, "deleting the NetworkPolicy allows again")
    after = {n: p["status"]["containerStatuses"][0]["restartCount"] for n, p in life.weft_pods().items()}
    assert after == restarts, f"weftd restarted: {restarts} -> {after}"


def test_node_deleted_from_api_loses_its_routes(life: Life) -> None:
    """The worker's kubelet stopped and its Node deleted: the control-plane node removes the route to the worker's
    subnet, and the VTEP's FDB and neighbour entries for it."""
    worker = json.loads(life.kubectl("get", "node", WORKER, "-o", "json").stdout)
    subnet = worker["spec"]["podCIDR"]
    ann = worker["metadata"]["annotations"]
    mac = json.loads(ann[ANN_DATA])["VtepMAC"]
    underlay_ip = ann[ANN_IP]
    control = life.node(CONTROL)

    def state() -> tuple[bool, bool, bool]:
        routes = json.loads(control.run("ip", "-j", "route", "show", subnet).stdout or "[]")
        fdb = json.loads(control.run("bridge", "-j", "fdb", "show", "dev", "weft.1").stdout or "[]")
        neigh = json.loads(control.run("ip", "-j", "neigh", "show", "dev", "weft.1").stdout or "[]")
        return (any(r["dst"] == subnet for r in routes),
                any(f.get("mac") == mac and f.get("dst") == underlay_ip for f in fdb),
                any(n.get("lladdr") == mac for n in neigh))

    assert state() == (True, True, True), "the control-plane node had no route, FDB or neighbour for the worker"
    life.stop_daemon(WORKER, "kubelet")
    life.kubectl("delete", "node", WORKER)
    deleted = time.monotonic()
    life.until(lambda: state() == (False, False, False), 60, f"{CONTROL} forgets {WORKER} (route, fdb, neigh)")
    print(f"node deleted: {CONTROL} removed the route, FDB and neighbour within {time.monotonic() - deleted:.1f}s")
