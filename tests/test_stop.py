"""weftd stops promptly on SIGTERM in every state, and retries what it cannot reach with backoff and few log lines.

Each test starts a real weftd in a simulated node (tests/cluster.py), brings it to one state, sends one SIGTERM and
measures how long the process takes to exit. kubelet waits 30 s before SIGKILL; weftd's target is 2 s, and the
bound asserted here (STOP_BOUND) is generous for a loaded machine while far below what waiting for the next resync
(`--resync 120`) or a blocked network call would take. The unreachable servers are the test's own: a port nothing
listens on in the node's namespace (refused) and a listener there that accepts connections and never answers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, ClusterNode, MakeCluster

STOP_BOUND = 5.0
SLOW_RESYNC = ("--resync", "120")
QUIET = ("--log-level", "info")  # the log as an operator reads it (the cluster runs weftd at debug)
SILENT_PORT = 6443  # the silent listener's port, in the node's namespace
REFUSED = "127.0.0.1:1"  # nothing listens there: connections are refused
TIMES: dict[str, float] = {}  # measured stop times, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_times() -> Iterator[None]:
    yield
    if TIMES:
        print("\nweftd stop times after SIGTERM: " + ", ".join(f"{k} {v:.2f} s" for k, v in TIMES.items()))


def stop_timed(c: Cluster, cn: ClusterNode, state: str) -> float:
    """SIGTERM (once), then the seconds until weftd exited; it must exit 0 within STOP_BOUND."""
    assert cn.proc is not None
    assert cn.proc.poll() is None, f"weftd exited before the SIGTERM:\n{cn.log.read_text()[-3000:]}"
    t = time.monotonic()
    cn.proc.send_signal(signal.SIGTERM)
    try:
        rc = cn.proc.wait(60)
    except subprocess.TimeoutExpired:
        cn.proc.kill()
        cn.proc.wait(10)
        rc = None
    took = time.monotonic() - t
    cn.proc = None
    TIMES[state] = took
    log = cn.log.read_text()
    assert rc == 0, f"{state}: exit code {rc} after {took:.1f} s:\n{log[-3000:]}"
    assert took < STOP_BOUND, f"{state}: took {took:.1f} s to stop:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    return took


class Silent:
    """A TCP listener in `ns` that accepts every connection and never sends a byte; counts what it accepted."""

    CODE = ("import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((sys.argv[1],int(sys.argv[2])));s.listen(64)\n"
            "print('up',flush=True);held=[]\n"
            "while True:\n c,_=s.accept();held.append(c);print('conn',flush=True)\n")

    def __init__(self, cn: ClusterNode, ip: str = "127.0.0.1", port: int = SILENT_PORT) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", cn.ns.name, sys.executable, "-c", self.CODE, ip,
                                      str(port)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "up"
        self.accepted = 0

    def wait_connections(self, n: int, timeout: float = 60) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while self.accepted < n:
            assert time.monotonic() < deadline, f"only {self.accepted} connections to the silent listener"
            assert self.proc.stdout.readline().strip() == "conn"
            self.accepted += 1

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for an API server at `server` (host:port) that weftd only ever tries to reach."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://{server}", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path


def log_has(c: Cluster, cn: ClusterNode, text: str, timeout: float = 60) -> None:
    c.until(lambda: text in cn.log.read_text(), timeout, repr(text), cn)


# ---- ready: sleeping between resyncs, serving the CNI socket ----


def test_stop_while_sleeping_between_resyncs(make_cluster: MakeCluster) -> None:
    """Ready, a pod attached through the CNI socket, then idle: the next resync is two minutes away."""
    c = make_cluster("vxlan")
    cn = c.add_node("n1")
    c.start(cn, *SLOW_RESYNC)
    c.wait_ready(cn)
    c.pod(cn, "a")
    routes, vtep = cn.routes(), cn.ns.links()["weft.1"]
    time.sleep(1)
    stop_timed(c, cn, "sleeping between resyncs (--resync 120), CNI socket served")
    assert not cn.node.socket.exists(), "the CNI socket is removed when weftd stops"
    assert "stopped; kernel state left in place" in cn.log.read_text()
    # The kernel state stays, so pod traffic keeps flowing across a restart.
    assert cn.routes() == routes and cn.ns.links()["weft.1"]["address"] == vtep["address"]
    assert cn.subnet_file.exists() and cn.conflist.exists()


def test_stop_with_policy_from_a_directory(make_cluster: MakeCluster, tmp_path: Path) -> None:
    """The policy engine's loop (here from --policy-dir) stops with the daemon."""
    c = make_cluster("vxlan")
    cn = c.add_node("n1")
    (tmp_path / "policies").mkdir()
    c.start(cn, *SLOW_RESYNC, "--policy-dir", str(tmp_path / "policies"))
    c.wait_ready(cn)
    time.sleep(1)
    stop_timed(c, cn, "ready with --policy-dir")
    tables = cn.ns.run("nft", "list", "tables").stdout
    assert "weft_policy" in tables, "the policy tables stay when weftd stops"


def test_stop_mid_reconcile(make_cluster: MakeCluster) -> None:
    """The first reconcile programs 6,000 peers (about a second here); SIGTERM arrives while their entries are going
    in. weftd exits without finishing the round (or just after it) and without writing the node config."""
    c = make_cluster("vxlan", net={"Network": "10.0.0.0/8"})
    peers = 6000
    leases = {f"p{i}": {"Node": f"p{i}", "BackendType": "vxlan", "Subnet": f"10.{1 + i // 256}.{i % 256}.0/24",
                        "PublicIP": f"172.16.{i // 256}.{1 + i % 250}", "PublicIPv6": None,
                        "BackendData": {"VNI": 1, "VtepMAC": f"0a:00:00:00:{i // 256:02x}:{i % 256:02x}"}}
              for i in range(peers)}
    (c.dir / "store.json").write_text(json.dumps({"config": c.net_conf, "leases": leases}))
    cn = c.add_node("n1")
    c.start(cn, *SLOW_RESYNC, *QUIET)
    # The round's first FDB entries are in the kernel (after its neighbours, before its routes).
    c.until(lambda: "permanent" in cn.ns.run("bridge", "fdb", "show", "dev", "weft.1", check=False).stdout, 60,
            "the first reconcile under way", cn)
    stop_timed(c, cn, f"mid-reconcile ({peers} peers)")
    log = cn.log.read_text()
    assert "reconciled" not in log.split("SIGTERM: stopping")[0], "the round had ended before the SIGTERM"
    assert "ready:" not in log and not cn.conflist.exists()


# ---- waiting for a store ----


def test_stop_while_etcd_refuses(make_cluster: MakeCluster) -> None:
    """etcd refuses connections at start: weftd retries (it does not exit 2), says which endpoint and why, once,
    and stops promptly while waiting."""
    c = make_cluster("vxlan", store="etcd")
    cn = c.add_node("n1")
    c.start(cn, "--etcd-endpoint", f"http://{REFUSED}", *QUIET)
    log_has(c, cn, "unreachable")
    time.sleep(4)  # a few retries
    log = cn.log.read_text()
    lines = [line for line in log.splitlines() if "unreachable" in line]
    assert len(lines) == 1, log
    assert f"etcd http://{REFUSED}" in lines[0] and "connection refused" in lines[0], lines[0]
    stop_timed(c, cn, "etcd refusing (network config read)")


def test_stop_while_etcd_does_not_answer(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan", store="etcd")
    cn = c.add_node("n1")
    silent = Silent(cn, port=2379)
    try:
        c.start(cn, "--etcd-endpoint", "http://127.0.0.1:2379", *QUIET)
        silent.wait_connections(1)
        stop_timed(c, cn, "etcd not answering (network config read)")
    finally:
        silent.close()


def test_stop_while_the_kube_api_refuses(make_cluster: MakeCluster) -> None:
    """The kube store (with --policy-kube, as the DaemonSet runs it) and an API server that refuses: one short line
    naming the server, no urllib3 retry warnings, retried with backoff, and a prompt stop."""
    c = make_cluster("vxlan", store="kube")
    c.kubeconfig = kubeconfig(c.dir / "kubeconfig", REFUSED)
    cn = c.add_node("n1")
    c.start(cn, *QUIET)
    log_has(c, cn, "unreachable")
    time.sleep(4)
    log = cn.log.read_text()
    lines = log.splitlines()
    failing = [line for line in lines if "unreachable" in line]
    assert len(failing) == 1, log
    assert f"API server https://{REFUSED} unreachable: connection refused" in failing[0], failing[0]
    assert "Retrying" not in log and "urllib3" not in log, log
    assert len(lines) < 10, log  # the operator's example wrote 126 lines in 6 s
    stop_timed(c, cn, "kube API refusing (lease read)")


def test_stop_while_the_kube_api_does_not_answer(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan", store="kube")
    cn = c.add_node("n1")
    silent = Silent(cn)
    try:
        c.kubeconfig = kubeconfig(c.dir / "kubeconfig", f"127.0.0.1:{SILENT_PORT}")
        c.start(cn, *QUIET)
        silent.wait_connections(1)
        stop_timed(c, cn, "kube API not answering (lease read)")
    finally:
        silent.close()


# ---- listing for policy ----


def test_stop_while_listing_policy_objects_from_a_silent_api_server(make_cluster: MakeCluster) -> None:
    """The operator's case: --policy-kube against an API server that never answers. The file store works, so weftd
    gets as far as the policy source's first list of Pods, Namespaces and NetworkPolicies, and waits there."""
    c = make_cluster("vxlan")
    cn = c.add_node("n1")
    silent = Silent(cn)
    try:
        config = kubeconfig(c.dir / "kubeconfig", f"127.0.0.1:{SILENT_PORT}")
        c.start(cn, *SLOW_RESYNC, *QUIET, "--policy-kube", "--kubeconfig", str(config))
        silent.wait_connections(3)  # one list per kind
        stop_timed(c, cn, "policy-kube listing, API server not answering")
        assert not cn.conflist.exists()
    finally:
        silent.close()


def test_stop_while_listing_policy_objects_from_a_refusing_api_server(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    cn = c.add_node("n1")
    config = kubeconfig(c.dir / "kubeconfig", REFUSED)
    c.start(cn, *SLOW_RESYNC, *QUIET, "--policy-kube", "--kubeconfig", str(config))
    log_has(c, cn, "unreachable")
    time.sleep(4)
    log = cn.log.read_text()
    failing = [line for line in log.splitlines() if "unreachable" in line]
    assert len(failing) == 3, log  # one per kind listed
    assert "Retrying" not in log, log
    stop_timed(c, cn, "policy-kube listing, API server refusing")
