"""Where a cluster's nodes live and what they are called, and the record of what `up` made.

Everything of one cluster sits under its directory (`.build/cluster` for `make cluster`). The names
that must be unique on the machine (network namespaces, cgroup roots) carry a tag derived from that
directory, so two checkouts, or the smoke test beside a running `make cluster`, do not collide.
`down` undoes what the record names, so it also cleans up after an `up` that failed half way.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab import ROOT

CLUSTER_DIR = ROOT / ".build" / "cluster"
IMAGES_DIR = ROOT / ".build" / "images"
KUBE_BIN = ROOT / ".build" / "kube" / "current"
KUBECTL = KUBE_BIN / "kubectl"  # Debian's kubernetes-client of the same version (make kubectl)
MANIFEST = ROOT / "conf" / "kube-weft.yml"
CLUSTER_DNS_MANIFEST = ROOT / "tools" / "clusterdns" / "clusterdns.yml"

POD_CIDR = "10.244.0.0/16"  # conf/kube-weft.yml's Network
NODE_CIDR_MASK = 24
SERVICE_CIDR = "10.96.0.0/12"
CLUSTER_DNS = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
UNDERLAY = "172.18.0"  # the nodes' eth0 network, a /24 on a bridge in a namespace of its own
GATEWAY = f"{UNDERLAY}.1"
APISERVER_PORT = 6443


# The images the tests' and benches' small clusters import: Weft, the sandbox and busybox pods (agnhost
# and the cluster DNS would only add import time).
NODE_IMAGES = ("weft.tar", "pause.tar", "busybox.tar")


def missing_binaries() -> list[str]:
    """The Kubernetes binaries a node needs that `make kube kubectl` has not built yet."""
    return [b for b in ("kubelet", "kube-proxy", "kubectl") if not (KUBE_BIN / b).exists()]


def image_selection(directory: Path, names: tuple[str, ...] = NODE_IMAGES) -> Path:
    """`directory`, made to hold links to the named archives of IMAGES_DIR only (what `up --images` imports)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = directory / name
        link.unlink(missing_ok=True)
        link.symlink_to(IMAGES_DIR / name)
    return directory


def node_names(count: int) -> list[str]:
    """kind's names: the control-plane node, then weft-worker, weft-worker2, ..."""
    if count < 1:
        raise ValueError("a cluster needs at least one node")
    return ["weft-control-plane"] + [f"weft-worker{i if i > 1 else ''}" for i in range(1, count)]


@dataclass(frozen=True)
class Layout:
    dir: Path

    @property
    def tag(self) -> str:
        return "k" + hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:4]

    @property
    def underlay(self) -> str:
        return f"{self.tag}-underlay"

    def netns(self, node: str) -> str:
        return f"{self.tag}-{node.removeprefix('weft-')}"

    def cgroup_root(self, node: str) -> str:
        """The node's kubelet cgroupRoot: every kubelet shares the machine's hierarchies."""
        return f"/{self.tag}-{node}"

    def node_dir(self, node: str) -> Path:
        return self.dir / node

    @staticmethod
    def ip(index: int) -> str:
        return f"{UNDERLAY}.{index + 2}"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def kubeconfig(self) -> Path:
        """The admin's, for the machine: through the forwarder on the machine's loopback."""
        return self.dir / "kubeconfig"

    @property
    def record(self) -> Record:
        return Record(self.dir / "made.jsonl")


def proc_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None once it is gone or a zombie: with the PID it
    names one process, so a PID reused after a reboot or a wrap is never taken for ours."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass(frozen=True)
class Record:
    """What `up` made, one JSON object a line, written as it is made."""

    path: Path

    def add(self, kind: str, **entry: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, **entry}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def process(self, name: str, pid: int) -> None:
        self.add("process", name=name, pid=pid, start=proc_start(pid))

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [e for e in out if kind is None or e["kind"] == kind]

    def alive(self) -> list[dict[str, Any]]:
        """The recorded processes that still run (same PID, same start time)."""
        return [e for e in self.entries("process") if e["start"] is not None and proc_start(e["pid"]) == e["start"]]
