"""A private containerd (Debian's package) inside a node's network namespace, for end-to-end tests.

containerd gets its own root, state, config and socket. It runs under `nsenter --net` in a private
mount namespace rather than `ip netns exec`, so it keeps the machine's cgroup mounts (v1, hybrid or
v2) instead of a fresh sysfs without them. `ctr run --cni` reads the fixed paths /etc/cni/net.d and
/opt/cni/bin and caches results in /var/lib/cni, so ctr runs in a private mount namespace where
throw-away overlays on /etc and /var/lib and a tmpfs on /opt put the test's directories there;
nothing on the machine itself changes.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.lab import ROOT, SOCKET_DIR, Netns

IMAGE = "local/busybox:1"
IMAGE_BUILDER = ROOT / "tools" / "busybox-image.sh"

ENTER = """
set -e
d=$1; shift
mount -t overlay overlay -o lowerdir=/etc,upperdir=$d/ovl/upper,workdir=$d/ovl/work /etc
mount -t overlay overlay -o lowerdir=/var/lib,upperdir=$d/ovl/var-upper,workdir=$d/ovl/var-work /var/lib
mkdir -p /etc/cni/net.d
mount --bind $d/net.d /etc/cni/net.d
mount -t tmpfs tmpfs /opt
mkdir -p /opt/cni/bin
mount --bind $d/bin /opt/cni/bin
exec "$@"
"""


def busybox_archive() -> Path:
    """The busybox image as an OCI archive for `ctr images import`, built by tools/busybox-image.sh into
    .build and rebuilt when that script changes."""
    target = ROOT / ".build" / "busybox-oci.tar"
    if not target.exists() or target.stat().st_mtime < IMAGE_BUILDER.stat().st_mtime:
        target.parent.mkdir(exist_ok=True)
        p = subprocess.run(["bash", str(IMAGE_BUILDER), str(target), IMAGE], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{IMAGE_BUILDER} failed: {p.stdout}{p.stderr}")
    return target


def cri_config() -> str:
    """containerd's configuration on a Kubernetes node made of namespaces (tests/k8s): the CRI plugin
    with the default root, state and socket (each node binds its own over them), overlayfs, runc
    with cgroupfs, and the CNI directories kubelet's pods are networked from."""
    return """version = 2
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.2"
  tolerate_missing_hugetlb_controller = true
  disable_apparmor = true
  # No CAP_SYS_RESOURCE in these machines' bounding set: runc cannot lower a sandbox's oom_score_adj
  # to kubelet's -998, and every sandbox would fail ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"""


class Containerd:
    def __init__(self, ns: Netns, workdir: Path, namespace: str) -> None:
        self.ns = ns
        self.dir = workdir
        self.namespace = namespace
        self.socket = SOCKET_DIR / f"{namespace}.sock"
        self.cni = workdir / "cni"
        for d in ("root", "state", "cni/bin", "cni/net.d", "cni/ovl/upper", "cni/ovl/work", "cni/ovl/var-upper",
                  "cni/ovl/var-work"):
            (workdir / d).mkdir(parents=True, exist_ok=True)
        SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "config.toml"
        self.config.write_text(
            f'version = 2\nroot = "{workdir / "root"}"\nstate = "{workdir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",\n'
            '  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",\n'
            '  "io.containerd.snapshotter.v1.devmapper"]\n'
            f'[grpc]\n  address = "{self.socket}"\n[ttrpc]\n  address = "{self.socket}.ttrpc"\n')
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "CONTAINERD_SNAPSHOTTER": "native"}

    def start(self) -> None:
        log = open(self.dir / "containerd.log", "ab")
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "nsenter", f"--net={self.ns.path}",
             "containerd", "--config", str(self.config)], stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("containerd did not start:\n" + (self.dir / "containerd.log").read_text()[-2000:])

    def ctr_cmd(self, *args: str) -> list[str]:
        return ["ctr", "-a", str(self.socket), "-n", self.namespace, *args]

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.ctr_cmd(*args), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: {p.stdout}{p.stderr}")
        return p

    def run_cni(self, *args: str) -> list[str]:
        """`ctr run --cni ...` as a command line: in the node netns, with this test's CNI directories."""
        return ["unshare", "-m", "--propagation", "private", "nsenter", f"--net={self.ns.path}",
                "sh", "-c", ENTER, "sh", str(self.cni), *self.ctr_cmd("run", "--cni", *args)]

    def stop(self) -> None:
        if self.proc is not None:
            for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "KILL", task, check=False)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        # runc made one cgroup per container under /<namespace> in every hierarchy.
        cgroups = Path("/sys/fs/cgroup")
        for d in [p for p in (cgroups / self.namespace, *cgroups.glob(f"*/{self.namespace}")) if p.is_dir()]:
            for sub in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
                if sub.is_dir():
                    sub.rmdir()
            d.rmdir()
        for p in (self.socket, Path(f"{self.socket}.ttrpc")):
            p.unlink(missing_ok=True)
