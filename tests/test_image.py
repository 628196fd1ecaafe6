"""Weft's image (`make image`) as a node's containerd runs it: the archive imports under the name the
manifest's `weft:<version>` stands for, and its container runs the frozen bundle `make build` made,
installs the plugins as the DaemonSet's init container does, and has the tools weftd calls."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containerd import Containerd
from tests.lab import ROOT, Lab, Node
from weftlib.version import version

NAME = f"docker.io/library/weft:{version()}"


@pytest.fixture(scope="module")
def archive() -> Path:
    path = Path(os.environ.get("WEFT_IMAGE", ROOT / ".build" / "images" / "weft.tar"))
    if not path.exists():
        pytest.fail(f"no image archive at {path}: run `make image`")
    return path


def image_config(archive: Path) -> dict[str, Any]:
    """The OCI config of the archive's one image, read from its layout."""
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> Any:
            f = tar.extractfile(f"./blobs/sha256/{digest.removeprefix('sha256:')}")
            assert f is not None
            return json.load(f)
        f = tar.extractfile("./index.json")
        assert f is not None
        (manifest,) = json.load(f)["manifests"]
        assert manifest["annotations"]["org.opencontainers.image.ref.name"] == NAME
        config: dict[str, Any] = blob(blob(manifest["digest"])["config"]["digest"])["config"]
        return config


@pytest.fixture
def containerd(lab: Lab, node: Node, archive: Path, tmp_path: Path) -> Iterator[Containerd]:
    ctrd = Containerd(node.ns, tmp_path / "containerd", f"weft-image-{lab.tag}")
    # As a node's containerd: each container a mount over the image's layers, not a copy of them.
    ctrd.env["CONTAINERD_SNAPSHOTTER"] = "overlayfs"
    try:
        ctrd.start()
        ctrd.ctr("images", "import", str(archive), timeout=300)
        yield ctrd
    finally:
        ctrd.stop()


def test_the_image_runs_the_bundle_and_installs_the_plugins(containerd: Containerd, archive: Path,
                                                            bundle: Path) -> None:
    assert NAME in containerd.ctr("images", "ls", "-q").stdout.split()
    config = image_config(archive)
    assert config["Entrypoint"] == ["/opt/weft/bundle/weftd"] and config["Cmd"] == ["run"]
    runs = iter(range(100))

    def run(*cmd: str) -> str:
        return containerd.ctr("run", "--rm", NAME, f"weft-image-{next(runs)}", *cmd).stdout

    assert run("/opt/weft/bundle/weftd", "--version").strip() == f"weftd {version()}"
    # In one container: `make build`'s bundle, not another one; the init container's command, then the
    # runtime's view, the installed plugins answering VERSION; what weftd runs on a node: nft and
    # iptables (both modes), wg, wireguard-go.
    out = run("sh", "-c", "cd /opt/weft/bundle && sha256sum weft-py weft && "
              "sh /opt/weft/install.sh install /opt/weft/bundle /host/opt/cni/bin/.weft /host/opt/cni/bin >&2 && "
              "for p in weft weft-ipam; do CNI_COMMAND=VERSION /host/opt/cni/bin/$p </dev/null; done && "
              "nft --version && iptables-nft --version && iptables-legacy --version && wg --version && "
              "wireguard-go --version")
    lines = out.splitlines()
    sums = dict(reversed(line.split()) for line in lines[:2])
    for name in ("weft-py", "weft"):
        assert sums[name] == hashlib.sha256((bundle / name).read_bytes()).hexdigest(), name
    answers = [json.loads(line) for line in lines[2:4]]
    assert all("1.0.0" in a["supportedVersions"] for a in answers), out
    for tool in ("nftables", "nf_tables", "legacy", "wireguard-tools", "wireguard-go"):
        assert tool in "\n".join(lines[4:]), out
