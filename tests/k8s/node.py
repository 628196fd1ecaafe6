"""One Kubernetes node made of Linux namespaces, as kind makes one of a container.

A node is a network namespace (eth0 on the cluster's underlay bridge), and a mount and UTS namespace
kept alive by a holder process (`sleep infinity`). In its mount namespace:
- /etc, /var and /opt are overlays on the machine's, with the node's writes under its directory, so
  every node has its own /etc/cni/net.d, /opt/cni/bin, /var/lib/kubelet, /var/lib/cni, /var/log/pods,
  /etc/kubernetes, /etc/machine-id and whatever hostPath a DaemonSet names, and the machine's own
  directories never change;
- /var/lib/containerd is a tmpfs (overlayfs snapshots cannot live on an overlay): the images unpack
  into memory, about 0.5 GB a node, and vanish with the node, where deleting them from the disk
  took over a minute on a busy machine;
- /run is a tmpfs of its own (containerd's socket and state, /run/netns where containerd pins pod
  network namespaces, weftd's socket, the xtables lock);
- /sys is the node network namespace's sysfs, with the machine's cgroup hierarchies mounted again;
- the global sysctls kubelet writes at start are regular files of the node, so the machine's values
  stay as they are;
- everything is rshared inside the node (kubelet's volumes reach containers), and private from the
  machine: nothing mounted in a node shows on the machine.
Daemons run in the node through `nsenter --target <holder>`, which execs them: the recorded PID is
the daemon's.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.k8s.layout import CLUSTER_DNS, CLUSTER_DOMAIN, GATEWAY, KUBE_BIN, POD_CIDR, Layout, Record

# kubelet writes these at start (pkg/kubelet/cm/container_manager_linux.go); they are global.
KUBELET_SYSCTLS = ("kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "vm/panic_on_oom",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
OVERLAID = ("etc", "var", "opt")
# What a kind node image ships in /opt/cni/bin that containerd and Weft's conflist use: CRI sets up
# every sandbox's lo with `loopback`, and Weft's conflist chains `portmap` for hostPorts.
NODE_CNI_PLUGINS = ("loopback", "portmap")
REFERENCE_CNI = Path("/usr/lib/cni")
CGROUP_FS = Path("/sys/fs/cgroup")
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup mount of the machine under /sys/fs/cgroup."""

    mountpoint: Path
    fstype: str  # cgroup (v1) or cgroup2
    options: str  # v1: the controllers, or name=...

    def mount(self) -> str:
        if self.fstype == "cgroup2":
            return f"mount -t cgroup2 cgroup2 {shlex.quote(str(self.mountpoint))}"
        return f"mount -t cgroup -o {shlex.quote(self.options)} cgroup {shlex.quote(str(self.mountpoint))}"


def cgroup_hierarchies() -> list[Hierarchy]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        mountpoint = Path(pre.split()[4])
        fstype, _, superopts = post.split()[:3]
        if fstype in ("cgroup", "cgroup2") and mountpoint.is_relative_to(CGROUP_FS):
            options = ",".join(o for o in superopts.split(",") if o not in ("rw", "ro"))
            out.append(Hierarchy(mountpoint, fstype, options))
    return out


def holder_script(node_dir: Path, hostname: str) -> str:
    d = shlex.quote(str(node_dir))
    hierarchies = cgroup_hierarchies()
    lines = ["set -eu", "mount -t sysfs sysfs /sys"]
    if any(h.mountpoint == CGROUP_FS for h in hierarchies):  # cgroup v2 alone
        lines += [h.mount() for h in hierarchies]
    else:
        lines.append(f"mount -t tmpfs -o mode=755 cgroup {CGROUP_FS}")
        for h in hierarchies:
            lines += [f"mkdir -p {shlex.quote(str(h.mountpoint))}", h.mount()]
        lines += [f"ln -s {shlex.quote(str(p.readlink()))} {shlex.quote(str(p))}"
                  for p in CGROUP_FS.iterdir() if p.is_symlink()]
    for top in OVERLAID:
        lines.append(f"mount -t overlay overlay -o lowerdir=/{top},upperdir={d}/overlay/{top}/upper,"
                     f"workdir={d}/overlay/{top}/work /{top}")
    lines += [
        "mkdir -p /var/lib/containerd /etc/cni/net.d /opt/cni/bin /etc/kubernetes",
        "mount -t tmpfs -o mode=711 containerd /var/lib/containerd",
        "mount -t tmpfs -o mode=755 run /run",
        "mkdir -p /run/netns /run/lock",
        *[f"cp {REFERENCE_CNI / p} /opt/cni/bin/" for p in NODE_CNI_PLUGINS],
        f"echo {uuid.uuid4().hex} > /etc/machine-id",
        *[f"mount --bind {d}/sysctl/{s.replace('/', '.')} /proc/sys/{s}" for s in KUBELET_SYSCTLS],
        "mount --make-rshared /",
        f"hostname {shlex.quote(hostname)}",
        f"touch {d}/holder-ready",
        "exec sleep infinity",
    ]
    return "\n".join(lines) + "\n"


def run(*cmd: str, check: bool = True, input: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


@dataclass
class KubeNode:
    name: str
    index: int
    layout: Layout
    holder: int | None = None

    @property
    def ip(self) -> str:
        return self.layout.ip(self.index)

    @property
    def netns(self) -> str:
        return self.layout.netns(self.name)

    @property
    def dir(self) -> Path:
        return self.layout.node_dir(self.name)

    @property
    def conf(self) -> Path:
        """The node's configuration files, read by its daemons through the machine's path."""
        return self.dir / "conf"

    def log(self, daemon: str) -> Path:
        return self.layout.logs / f"{self.name}.{daemon}.log"

    # --- namespaces

    def create(self, record: Record, port: str) -> None:
        """The network namespace on the underlay (`port`: the bridge port's name), the holder of the mount and UTS
        namespaces, and the kubelet's cgroup root in every hierarchy."""
        run("ip", "netns", "add", self.netns)
        record.add("netns", name=self.netns)
        underlay = self.layout.underlay
        run("ip", "-n", self.netns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", underlay)
        run("ip", "-n", underlay, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        run("ip", "-n", self.netns, "link", "set", "eth0", "up")
        run("ip", "-n", self.netns, "link", "set", "lo", "up")
        run("ip", "-n", self.netns, "route", "add", "default", "via", GATEWAY)

        for top in OVERLAID:
            for sub in ("upper", "work"):
                (self.dir / "overlay" / top / sub).mkdir(parents=True, exist_ok=True)
        self.conf.mkdir(exist_ok=True)
        (self.dir / "sysctl").mkdir(exist_ok=True)
        for s in KUBELET_SYSCTLS:
            (self.dir / "sysctl" / s.replace("/", ".")).write_text((Path("/proc/sys") / s).read_text())
        ready = self.dir / "holder-ready"
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", holder_script(self.dir, self.name)],
            stdin=subprocess.DEVNULL, stdout=open(self.log("holder"), "ab"), stderr=subprocess.STDOUT,
            start_new_session=True, cwd="/")
        record.process(f"{self.name}/holder", proc.pid)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}'s namespaces: {self.log('holder').read_text()[-2000:]}")
            time.sleep(0.05)
        self.holder = proc.pid
        record.add("node", name=self.name, holder=proc.pid, cgroup=self.layout.cgroup_root(self.name))
        for h in cgroup_hierarchies():
            d = h.mountpoint / self.layout.cgroup_root(self.name).lstrip("/")
            d.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (h.mountpoint / f).exists():
                    (d / f).write_text((h.mountpoint / f).read_text())

    def enter(self, *cmd: str) -> list[str]:
        assert self.holder is not None, f"{self.name} has no namespaces"
        # --root: entering a mount namespace resets the root to the namespace's own, which escapes a chroot
        # (a CI machine may run in one); the holder's root is the one the node was made under.
        return ["nsenter", f"--target={self.holder}", "--mount", "--uts", "--net", "--root", "--", *cmd]

    def spawn(self, record: Record, daemon: str, *cmd: str) -> int:
        proc = subprocess.Popen(self.enter(*cmd), stdin=subprocess.DEVNULL, stdout=open(self.log(daemon), "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
                                env={"PATH": NODE_PATH, "HOME": "/root"})
        record.process(f"{self.name}/{daemon}", proc.pid)
        return proc.pid

    def run(self, *cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(*self.enter(*cmd), check=check, timeout=timeout)

    # --- containerd, kubelet, kube-proxy

    def start_containerd(self, record: Record, config: str) -> None:
        (self.conf / "containerd.toml").write_text(config)
        self.spawn(record, "containerd", "containerd", "--config", str(self.conf / "containerd.toml"))
        deadline = time.monotonic() + 60
        while self.run("ctr", "version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd on {self.name}: {self.log('containerd').read_text()[-2000:]}")
            time.sleep(0.2)

    def import_image(self, archive: Path) -> None:
        self.run("ctr", "-n", "k8s.io", "images", "import", str(archive.resolve()))

    def start_kubelet(self, record: Record, kubeconfig: Path, ca: Path) -> None:
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "cgroupRoot": self.layout.cgroup_root(self.name),
            "failSwapOn": False, "imageGCHighThresholdPercent": 100,
            "evictionHard": {"memory.available": "0%", "nodefs.available": "0%", "nodefs.inodesFree": "0%",
                             "imagefs.available": "0%"},
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ca)}},
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [CLUSTER_DNS], "clusterDomain": CLUSTER_DOMAIN,
        }
        path = self.conf / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        self.spawn(record, "kubelet", str(KUBE_BIN / "kubelet"), "--config", str(path),
                   "--kubeconfig", str(kubeconfig), "--container-runtime=remote",
                   "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
                   "--runtime-request-timeout=15m", f"--node-ip={self.ip}", f"--hostname-override={self.name}")

    def start_kube_proxy(self, record: Record, kubeconfig: Path) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)}, "mode": "iptables",
            "clusterCIDR": POD_CIDR, "hostnameOverride": self.name,
            # nf_conntrack_max is read-only outside the machine's network namespace; kind passes the same.
            "conntrack": {"maxPerCore": 0, "min": 0},
        }
        path = self.conf / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self.spawn(record, "kube-proxy", str(KUBE_BIN / "kube-proxy"), "--config", str(path))
