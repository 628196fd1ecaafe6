from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, MakeCluster
from tests.kubeapi import KubeAPI
from tests.lab import ROOT, Lab, Node

ROOT_MARKERS = ("cni0", "weft")


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line}


def _machine_cni_files() -> list[str]:
    """What the machine's own CNI directories hold: tests keep their stores and caches elsewhere."""
    return sorted(str(p) for d in ("/var/lib/cni", "/etc/cni", "/opt/cni") for p in Path(d).rglob("*"))


UNIT_DIR = Path(__file__).resolve().parent / "unit"

# Settings of the whole machine (or of its own network namespace, read from here) that no test may change: the
# ones kubelet writes at start, conntrack's table size, and forwarding in the root namespace.
HOST_SETTINGS = tuple(Path("/proc/sys") / p for p in (
    "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops", "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes", "net/netfilter/nf_conntrack_max", "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding", "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables"))


def _host_settings() -> dict[Path, str]:
    values = {}
    for path in HOST_SETTINGS:
        try:
            values[path] = path.read_text()
        except OSError:
            pass  # not on this kernel (bridge-nf-* without br_netfilter)
    return values


@pytest.fixture(autouse=True)
def host_settings_untouched() -> Iterator[None]:
    """Each test leaves the machine's own settings as it found them; one that does not fails, and its change is
    undone so that the next tests and the machine keep the values it came with."""
    before = _host_settings()
    yield
    after = _host_settings()
    changed = {p: (v, after.get(p)) for p, v in before.items() if after.get(p) != v}
    for path, (value, _) in changed.items():
        path.write_text(value)
    assert not changed, "host-wide settings changed: " + ", ".join(
        f"{p.relative_to('/proc/sys')} {old.strip()} -> {(new or '').strip()}" for p, (old, new) in changed.items())


def _needs_root(item: pytest.Item) -> bool:
    return not item.path.is_relative_to(UNIT_DIR)


@pytest.fixture(scope="session", autouse=True)
def root_namespace_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    """The machine's own network namespace must look the same after the whole run.

    Only when the run has tests that build network namespaces: tests/unit needs neither root nor the lab."""
    if not any(_needs_root(item) for item in request.session.items):
        yield
        return
    if os.geteuid() != 0:
        pytest.exit("Weft's tests build network namespaces and must run as root (tests/unit runs without)",
                    returncode=2)
    before, files_before = _root_links(), _machine_cni_files()
    yield
    assert _machine_cni_files() == files_before, "the machine's own CNI state directories changed"
    after = _root_links()
    assert after == before, f"root namespace links changed: +{after - before} -{before - after}"
    assert not any(n.startswith(ROOT_MARKERS) for n in after)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab")
    lab.base.mkdir()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def node(lab: Lab) -> Node:
    return lab.node()


@pytest.fixture
def make_cluster(lab: Lab) -> Iterator[MakeCluster]:
    made: list[Cluster] = []

    def make(backend: str = "vxlan", store: str = "file", two_segments: bool = False, net: dict[str, Any] | None = None,
             families: tuple[int, ...] | None = None, **opts: Any) -> Cluster:
        """`net`: net-conf keys beside Network and Backend; `families`: the underlay's (default: the pod network's)."""
        c = Cluster(lab, {"Network": "10.244.0.0/16", **(net or {}), "Backend": {"Type": backend, **opts}}, store,
                    two_segments, families)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="session")
def bundle() -> Path:
    """The frozen bundle from `make build`."""
    path = Path(os.environ.get("WEFT_BUNDLE", ROOT / ".build" / "dist" / "weft"))
    if not (path / "weft").exists():
        pytest.fail(f"no frozen bundle at {path}: run `make build`")
    return path


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPI]:
    """etcd and a real kube-apiserver in their own namespace, for the whole session."""
    lab = Lab(tmp_path_factory.mktemp("kubeapi"))
    api: KubeAPI | None = None
    try:
        api = KubeAPI(lab)
        api.start()
        yield api
    finally:
        if api is not None:
            api.close()
        lab.close()
