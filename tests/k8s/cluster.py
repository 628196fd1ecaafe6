"""`make cluster` and `make cluster-down`: a Kubernetes 1.20 cluster of namespace nodes (tests/k8s/node.py),
with Weft installed from conf/kube-weft.yml by `kubectl apply`, and its complete removal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tests.containerd import cri_config
from tests.k8s.control import (
    KUBE_PROXY,
    kubeconfig,
    make_credentials,
    start_etcd_apiserver,
    start_scheduler_controller_manager,
)
from tests.k8s.layout import (
    APISERVER_PORT,
    CLUSTER_DIR,
    CLUSTER_DNS_MANIFEST,
    GATEWAY,
    IMAGES_DIR,
    KUBE_BIN,
    KUBECTL,
    MANIFEST,
    Layout,
    node_names,
    proc_start,
)
from tests.k8s.node import KubeNode, cgroup_hierarchies, run
from tests.kubeapi import write_kubeconfig
from tests.lab import ROOT

BINARIES = ("kube-apiserver", "kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager", "kubectl")
TOOLS = ("etcd", "containerd", "ctr", "runc", "nsenter", "unshare", "iptables", "conntrack")
REQUIRED_IMAGES = ("weft.tar", "pause.tar")
WEFT_DAEMONSET = "ds/weft-ds"


class Cluster:
    def __init__(self, directory: Path = CLUSTER_DIR, images: Path = IMAGES_DIR,
                 say: Callable[[str], None] | None = None) -> None:
        self.layout = Layout(directory)
        self.images = images
        self.t0 = time.monotonic()
        self._say = say or (lambda line: print(line, flush=True))

    def say(self, what: str) -> None:
        self._say(f"[cluster {time.monotonic() - self.t0:6.1f}s] {what}")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(str(KUBECTL), "--kubeconfig", str(self.layout.kubeconfig), *args, input=input, check=check,
                   timeout=timeout)

    # --- up

    def up(self, count: int, weft: bool = True) -> None:
        """Boots `count` nodes and Weft (`weft`: False stops once every kubelet has registered, its node NotReady
        until the caller installs a CNI); a failure tears down what was made, keeping the logs."""
        self.preflight()
        try:
            self._up(count, weft)
        except BaseException:
            self.say(f"failed; tearing down (logs stay in {self.layout.logs})")
            self.down()
            raise

    def preflight(self) -> None:
        L = self.layout
        if L.record.entries():
            raise RuntimeError(f"a cluster is recorded in {L.dir}: run `make cluster-down` first")
        for top in ("etc", "var", "opt"):
            if L.dir.resolve().is_relative_to(f"/{top}"):
                raise RuntimeError(f"{L.dir} is under /{top}, which every node overlays: put the checkout elsewhere")
        missing = [str(KUBE_BIN / b) for b in BINARIES if not os.access(KUBE_BIN / b, os.X_OK)]
        missing += [t for t in TOOLS if shutil.which(t) is None]
        missing += [str(self.images / i) for i in REQUIRED_IMAGES if not (self.images / i).exists()]
        if missing:
            raise RuntimeError("missing (make deps kube kubectl image test-images): " + ", ".join(missing))

    def _up(self, count: int, weft: bool) -> None:
        L = self.layout
        record = L.record
        names = node_names(count)
        shutil.rmtree(L.logs, ignore_errors=True)
        L.logs.mkdir(parents=True)
        nodes = [KubeNode(name, i, L) for i, name in enumerate(names)]
        control = nodes[0]

        self.say(f"certificates and kubeconfigs for {count} nodes")
        make_credentials(L, control, names)

        self.say("underlay and node namespaces")
        run("ip", "netns", "add", L.underlay)
        record.add("netns", name=L.underlay)
        run("ip", "-n", L.underlay, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", L.underlay, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        run("ip", "-n", L.underlay, "link", "set", "br0", "up")
        # Underlay frames are the nodes' wire: they skip the underlay's iptables (the sysctl exists
        # once br_netfilter is loaded, and is per network namespace).
        run("ip", "netns", "exec", L.underlay, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", check=False)
        for i, node in enumerate(nodes):
            node.create(record, f"p{i}")

        self.say("containerd on every node")
        for node in nodes:
            node.start_containerd(record, cri_config())
        archives = sorted(self.images.glob("*.tar"))
        self.say("importing images into every node: " + " ".join(a.stem for a in archives))
        self.parallel([partial(import_images, node, archives) for node in nodes])

        self.say(f"etcd and kube-apiserver on {control.name}")
        start_etcd_apiserver(L, record, control)
        self.forward(control)
        self.wait_apiserver()

        self.say("kube-scheduler and kube-controller-manager")
        start_scheduler_controller_manager(L, record, control)
        self.say("kubelet and kube-proxy on every node")
        for node in nodes:
            node.start_kubelet(record, kubeconfig(L, node.name), L.pki / "ca.crt")
            node.start_kube_proxy(record, kubeconfig(L, KUBE_PROXY))
        self.until(lambda: len(self.node_objects()) == count, 180, "every kubelet registers its Node")
        if not weft:
            self.say(f"up without a CNI: {count} nodes, NotReady until one is installed")
            return
        self.install_weft()
        if CLUSTER_DNS_MANIFEST.exists() and (self.images / "clusterdns.tar").exists():
            self.say(f"cluster DNS: kubectl apply -f {CLUSTER_DNS_MANIFEST.relative_to(ROOT)}")
            self.kubectl("apply", "-f", str(CLUSTER_DNS_MANIFEST))
            self.kubectl("-n", "kube-system", "rollout", "status", "deploy/kube-dns", "--timeout=300s", timeout=320)
        self.say(f"up: {count} nodes\n$ kubectl --kubeconfig {self.shown(L.kubeconfig)} get nodes -o wide\n"
                 + self.kubectl("get", "nodes", "-o", "wide").stdout.rstrip())

    def install_weft(self) -> None:
        self.say(f"kubectl apply -f {MANIFEST.relative_to(ROOT)}")
        self.kubectl("apply", "-f", str(MANIFEST))
        self.say("waiting for the weft DaemonSet to roll out and every node to be Ready")
        self.wait_rollout("kube-weft", WEFT_DAEMONSET)
        self.until(self.all_ready, 180, "every node Ready")

    def node(self, name: str) -> KubeNode:
        """A node of the recorded cluster, to run commands and daemons in."""
        nodes = self.layout.record.entries("node")
        entry = next(e for e in reversed(nodes) if e["name"] == name)
        return KubeNode(name, node_names(len(nodes)).index(name), self.layout, holder=entry["holder"])

    def shown(self, path: Path) -> str:
        return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)

    def parallel(self, jobs: list[Callable[[], object]]) -> None:
        errors: list[BaseException] = []

        def run_job(job: Callable[[], object]) -> None:
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=run_job, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def forward(self, control: KubeNode) -> None:
        """The apiserver on the machine's 127.0.0.1 (tests/k8s/forward.py), and the admin's kubeconfig for it."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.k8s.forward", str(listener.fileno()), f"/run/netns/{control.netns}",
             control.ip, str(APISERVER_PORT)], pass_fds=[listener.fileno()], cwd=ROOT, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=open(self.layout.logs / "forward.log", "ab"), stderr=subprocess.STDOUT)
        listener.close()
        self.layout.record.process("forward", proc.pid)
        pki = self.layout.pki
        write_kubeconfig(self.layout.kubeconfig, f"https://127.0.0.1:{port}", pki / "ca.crt",
                         {"client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")})

    def wait_apiserver(self) -> None:
        def ready() -> bool:
            self.check_alive("etcd", "kube-apiserver", "forward")
            return self.kubectl("get", "--raw", "/readyz", check=False, timeout=20).returncode == 0

        self.until(ready, 300, "kube-apiserver ready")

    def check_alive(self, *daemons: str) -> None:
        record = self.layout.record
        alive = {e["name"] for e in record.alive()}
        for e in record.entries("process"):
            if e["name"].split("/")[-1] in daemons and e["name"] not in alive:
                log = self.layout.logs / (e["name"].replace("/", ".") + ".log")
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"{e['name']} exited:\n{tail}")

    def until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.describe()}")
            time.sleep(1)

    def wait_rollout(self, namespace: str, what: str, timeout: int = 300) -> None:
        p = self.kubectl("-n", namespace, "rollout", "status", what, f"--timeout={timeout}s", check=False,
                         timeout=timeout + 30)
        if p.returncode != 0:
            raise RuntimeError(f"{namespace}/{what} did not roll out: {p.stdout}{p.stderr}\n{self.describe()}")

    def node_objects(self) -> list[dict[str, Any]]:
        p = self.kubectl("get", "nodes", "-o", "json", check=False, timeout=30)
        items: list[dict[str, Any]] = json.loads(p.stdout)["items"] if p.returncode == 0 else []
        return items

    def all_ready(self) -> bool:
        nodes = self.node_objects()
        return bool(nodes) and all(any(c["type"] == "Ready" and c["status"] == "True"
                                       for c in n["status"].get("conditions", [])) for n in nodes)

    def describe(self) -> str:
        """What a failure report needs: nodes, pods, and the tails of the logs of daemons that exited."""
        out = []
        for args in (("get", "nodes", "-o", "wide"), ("get", "pods", "-A", "-o", "wide")):
            p = self.kubectl(*args, check=False, timeout=30)
            out.append(p.stdout + p.stderr)
        alive = {e["name"] for e in self.layout.record.alive()}
        for e in self.layout.record.entries("process"):
            if e["name"] not in alive:
                log = self.layout.logs / (e["name"].replace("/", ".") + ".log")
                out.append(f"--- {e['name']} exited ---\n" + (log.read_text(errors="replace")[-1500:]
                                                               if log.exists() else ""))
        return "\n".join(out)

    # --- down

    def down(self) -> None:
        """Stops what the cluster made and removes it: processes, network namespaces (and with them every veth,
        pod namespace and the nodes' mounts), cgroups in every hierarchy, and the state files; the logs stay.
        What the record names, and also every network namespace and cgroup named with the cluster's tag, so
        that an `up` killed before it recorded something leaves nothing either."""
        L = self.layout
        record = L.record
        procs = record.entries("process")
        netns = sorted({e["name"] for e in record.entries("netns")} | self.tagged_netns())
        roots = sorted({e["cgroup"] for e in record.entries("node")} | self.tagged_cgroups())
        if not (procs or netns or roots):
            self.say(f"no cluster recorded in {L.dir}")
            return
        self.say("stopping the daemons")
        stop([e for e in reversed(procs) if not e["name"].endswith("/holder")])
        self.say("stopping every process left in the nodes (pods, containerd's shims, the holders)")
        kill_members(netns, roots)
        stop([e for e in reversed(procs) if e["name"].endswith("/holder")])
        self.say("removing network namespaces")
        for name in reversed(netns):
            run("ip", "netns", "del", name, check=False)
        self.say("removing cgroups")
        for root in roots:
            for h in cgroup_hierarchies():
                remove_cgroup(h.mountpoint / root.lstrip("/"))
        self.say("removing the nodes' files")
        for name in {e["name"] for e in record.entries("node")} | {e["name"].split("/")[0] for e in procs
                                                                     if "/" in e["name"]}:
            shutil.rmtree(L.node_dir(name), ignore_errors=True)
        shutil.rmtree(L.pki, ignore_errors=True)
        L.kubeconfig.unlink(missing_ok=True)
        record.path.unlink(missing_ok=True)
        self.say("down")

    def tagged_netns(self) -> set[str]:
        return {p.name for p in Path("/run/netns").glob(f"{self.layout.tag}-*")}

    def tagged_cgroups(self) -> set[str]:
        return {f"/{d.name}" for h in cgroup_hierarchies() for d in h.mountpoint.glob(f"{self.layout.tag}-*")
                if d.is_dir()}

    # --- status

    def status(self) -> None:
        record = self.layout.record
        if not record.entries():
            self.say(f"no cluster recorded in {self.layout.dir}")
            return
        alive = {e["name"] for e in record.alive()}
        for e in record.entries("process"):
            self.say(f"{e['name']:45} pid {e['pid']:7} {'running' if e['name'] in alive else 'EXITED'}")
        p = self.kubectl("get", "nodes", "-o", "wide", check=False, timeout=30)
        self.say(f"kubectl --kubeconfig {self.shown(self.layout.kubeconfig)} get nodes -o wide\n{p.stdout}{p.stderr}")


def import_images(node: KubeNode, archives: list[Path]) -> None:
    for archive in archives:
        node.import_image(archive)


def kill_members(netns: list[str], roots: list[str]) -> None:
    """SIGKILL to every process in the nodes' network namespaces (containerd, its shims, hostNetwork
    containers, the holders) or under their kubelets' cgroup roots (every pod's containers), until there are
    none. A namespace is known by the inode of its /run/netns file, which pins it (so the inode cannot be
    another namespace's)."""
    inodes = {Path(f"/run/netns/{n}").stat().st_ino for n in netns if Path(f"/run/netns/{n}").exists()}
    deadline = time.monotonic() + 60
    while members := node_members(inodes, roots):
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the cluster survive SIGKILL: {members}")
        time.sleep(0.2)


def node_members(netns_inodes: set[int], cgroup_roots: list[str]) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            in_netns = (proc / "ns" / "net").stat().st_ino in netns_inodes
            cgroups = [line.split(":", 2)[2] for line in (proc / "cgroup").read_text().splitlines()]
        except (OSError, IndexError):
            continue
        in_cgroup = any(c == root or c.startswith(root + "/") for c in cgroups for root in cgroup_roots)
        if (in_netns or in_cgroup) and proc_start(int(proc.name)) is not None:
            out.append(int(proc.name))
    return out


def stop(procs: list[dict[str, Any]], grace: float = 5) -> None:
    """SIGTERM to each recorded process that is still the one recorded, SIGKILL after `grace` seconds (kube-apiserver
    takes a minute to end its watches)."""
    live = [e for e in procs if e["start"] is not None and proc_start(e["pid"]) == e["start"]]
    for e in live:
        os.kill(e["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        time.sleep(0.1)
        live = [e for e in live if proc_start(e["pid"]) == e["start"]]
    for e in live:
        os.kill(e["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(proc_start(e["pid"]) == e["start"] for e in live) and time.monotonic() < deadline:
        time.sleep(0.1)


def remove_cgroup(path: Path) -> None:
    """Removes a cgroup and its children, deepest first; an emptied cgroup can stay busy for a moment."""
    if not path.is_dir():
        return
    deadline = time.monotonic() + 30
    for d in [*sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), path]:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
