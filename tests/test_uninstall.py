"""conf/kube-weft-uninstall.yml on a simulated node: its containers' commands and environment, taken from
the manifest, run with the frozen bundle after weftd ran there, remove everything Weft made and
nothing else.

The node's host paths (the manifest's hostPath volumes) are the simulated node's directories, and
the image's paths are the bundle and packaging/install.sh, as the Dockerfile copies them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tests.cluster import ClusterNode, MakeCluster
from tests.lab import ROOT

INSTALL_MANIFEST = ROOT / "conf" / "kube-weft.yml"
UNINSTALL_MANIFEST = ROOT / "conf" / "kube-weft-uninstall.yml"


def pod_spec(manifest: Path) -> dict[str, Any]:
    (ds,) = [d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "DaemonSet"]
    spec: dict[str, Any] = ds["spec"]["template"]["spec"]
    return spec


class Container:
    """One container of a manifest, with the node's and the image's paths mapped to this machine's."""

    def __init__(self, spec: dict[str, Any], container: dict[str, Any], host: dict[str, Path],
                 image: dict[str, Path], unmounted: Path) -> None:
        volumes = {v["name"]: v for v in spec["volumes"]}
        # mount path in the container -> the machine's path for the volume's hostPath
        self.mounts = {PurePosixPath(m["mountPath"]): host[volumes[m["name"]]["hostPath"]["path"]]
                       for m in container.get("volumeMounts", []) if "hostPath" in volumes[m["name"]]}
        self.image = {PurePosixPath(k): v for k, v in image.items()}
        self.unmounted = unmounted
        self.container = container

    def path(self, value: str) -> str:
        """A path as the container sees it, on this machine: through its mounts or the image; anything
        else lands under `unmounted` (which does not exist), never on this machine's own paths."""
        p = PurePosixPath(value)
        for table in (self.mounts, self.image):
            for inside, outside in sorted(table.items(), key=lambda kv: -len(kv[0].parts)):
                if p == inside or p.is_relative_to(inside):
                    return str(outside / p.relative_to(inside))
        return str(self.unmounted / p.relative_to("/"))

    def command(self) -> list[str]:
        c = self.container
        return [self.path(a) if a.startswith("/") else a for a in [*c["command"], *c.get("args", [])]]

    def env(self, node_name: str) -> dict[str, str]:
        out = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        for e in self.container.get("env", []):
            if "valueFrom" in e:
                assert e["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, e
                out[e["name"]] = node_name
            else:
                out[e["name"]] = self.path(e["value"]) if e["value"].startswith("/") else e["value"]
        return out

    def run(self, cn: ClusterNode) -> subprocess.CompletedProcess[str]:
        """In the node's network namespace, as a hostNetwork pod runs."""
        p = cn.ns.run(*self.command(), env=self.env(cn.name), check=False)
        assert p.returncode == 0, f"{self.container['name']}: {p.stdout}{p.stderr}"
        return p


def host_paths(cn: ClusterNode, tmp: Path) -> dict[str, Path]:
    """The node's host paths that the manifests mount, as the simulated node has them."""
    return {"/etc/cni/net.d": cn.conflist.parent, "/run/weft": cn.subnet_file.parent,
            "/var/lib/cni/networks": cn.node.data_dir, "/var/lib/weft": cn.state_dir,
            "/opt/cni/bin": tmp / "opt-cni-bin", "/run/netns": tmp / "netns", "/run/xtables.lock": tmp / "xtables.lock",
            "/var/run/wireguard": tmp / "wireguard"}


def tables(cn: ClusterNode) -> set[str]:
    return {" ".join(line.split()[1:]) for line in cn.ns.run("nft", "list", "tables").stdout.splitlines()}


def routes(cn: ClusterNode) -> set[str]:
    return {json.dumps(r, sort_keys=True) for v in ("-4", "-6") for r in cn.ns.ip_json(v, "route", "show")}


def files(d: Path) -> dict[str, str]:
    """Every entry under `d`: the content of files, the target of symlinks."""
    return {str(p.relative_to(d)): f"-> {p.readlink()}" if p.is_symlink() else
            p.read_bytes().decode() if p.is_file() else "/" for p in sorted(d.rglob("*"))}


def weft_pod(cn: ClusterNode, conflist: dict[str, Any], cid: str, command: str) -> None:
    """A pod attached or detached with weftd's conflist's plugin, as the runtime runs it (a Kubernetes pod:
    weftd's policy engine records it)."""
    plugin = {**conflist["plugins"][0], "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
    pod = cn.node.pod(cid) if command == "ADD" else None
    out = cn.node.plugin(command, plugin, cid=cid, netns=pod.path if pod else "",
                         args=f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={cid}")
    assert out.rc == 0, out.stdout + out.stderr


def test_uninstall_manifest_removes_what_weft_made_and_nothing_else(bundle: Path, make_cluster: MakeCluster,
                                                                     tmp_path: Path) -> None:
    c = make_cluster("vxlan")
    policies = tmp_path / "policies"
    policies.mkdir()
    n1, n2 = c.boot(["n1", "n2"], extra=("--policy-dir", str(policies)))
    host = host_paths(n1, tmp_path)
    for d in ("/opt/cni/bin", "/run/netns", "/var/run/wireguard"):
        host[d].mkdir()
    image = {"/opt/weft/bundle": bundle, "/opt/weft/install.sh": ROOT / "packaging" / "install.sh",
             "/bin/sh": Path("/bin/sh")}
    unmounted = tmp_path / "unmounted"

    def containers(manifest: Path, kind: str) -> list[Container]:
        spec = pod_spec(manifest)
        return [Container(spec, ct, host, image, unmounted) for ct in spec[kind]]

    # The plugins, as the install manifest's init container puts them on the node.
    (install_cni,) = containers(INSTALL_MANIFEST, "initContainers")
    install_cni.run(n1)
    assert (host["/opt/cni/bin"] / "weft").resolve().is_relative_to(host["/opt/cni/bin"] / ".weft")
    # Two pods attached through weftd; one is deleted before the uninstall, one stays attached.
    conflist = json.loads(n1.conflist.read_text())
    weft_pod(n1, conflist, "gone", "ADD")
    weft_pod(n1, conflist, "gone", "DEL")
    weft_pod(n1, conflist, "stays", "ADD")
    # What is not Weft's: the node's own route, table, link, conflist, plugin, files beside Weft's.
    n1.ns.run("ip", "link", "add", "keep0", "type", "bridge")  # not Weft's, though a bridge
    n1.ns.run("ip", "route", "add", "198.51.100.0/24", "via", "192.168.77.200")
    n1.ns.run("nft", "add table inet other; add chain inet other c { type filter hook forward priority 0; }")
    (n1.conflist.parent / "99-other.conflist").write_text('{"name": "other"}')
    (host["/opt/cni/bin"] / "bridge").symlink_to("/usr/lib/cni/bridge")
    (n1.subnet_file.parent / "other.env").write_text("OTHER=1\n")
    (n1.node.data_dir / "other").mkdir()
    (n1.node.data_dir / "other" / "10.9.0.2").write_text("c\r\neth0")
    n1.state_dir.mkdir(exist_ok=True)
    (n1.state_dir / "other").write_text("kept")
    c.stop(n1)  # kubectl delete -f conf/kube-weft.yml

    weft_tables = {"inet weft", "inet weft_policy", "bridge weft_policy"}
    assert weft_tables <= tables(n1)
    assert {"weft.1", "cni0"} <= set(n1.ns.links())
    assert n1.routes() and n1.conflist.exists() and n1.subnet_file.exists()
    assert (n1.subnet_file.parent / "policy-pods.json").exists()
    lease_dir = n1.node.data_dir / "weft"
    leases = files(lease_dir)
    # Through the VTEP, the bridge and the pod's veth (weft<hash>), and of Weft's route protocol.
    own_routes = {r for r in routes(n1) if '"dev": "weft' in r or '"dev": "cni0"' in r or '"protocol": "119"' in r}
    assert len(own_routes) >= 2
    keep_routes = routes(n1) - own_routes
    keep = {d: files(host[d]) for d in ("/etc/cni/net.d", "/run/weft", "/var/lib/weft")}
    keep["/etc/cni/net.d"].pop(n1.conflist.name)
    for name in (n1.subnet_file.name, "policy-pods.json"):
        keep["/run/weft"].pop(name)

    uninstall, remove_cni = containers(UNINSTALL_MANIFEST, "initContainers")
    (done,) = containers(UNINSTALL_MANIFEST, "containers")
    assert done.command() == ["sleep", "infinity"]  # it only keeps the pod ready
    uninstall.run(n1)
    remove_cni.run(n1)

    assert tables(n1) == {"inet other"}
    assert "weft.1" not in n1.ns.links() and n1.routes() == []
    assert {d: files(host[d]) for d in keep} == keep
    assert sorted(p.name for p in host["/opt/cni/bin"].iterdir()) == ["bridge"]
    assert files(n1.node.data_dir / "other") == {"10.9.0.2": "c\r\neth0"}
    assert {"keep0", "eth0", "lo"} <= set(n1.ns.links())
    assert not unmounted.exists()
    # The attached pod keeps the bridge, its veth and its lease: only its own DEL may remove them.
    assert "cni0" in n1.ns.links() and files(lease_dir) == leases
    assert routes(n1) - keep_routes <= {r for r in own_routes if '"dev": "weft.1"' not in r and '"119"' not in r}
    assert keep_routes <= routes(n1)

    # Once that pod is deleted too (weftd is gone: the plugin runs it itself), a second run removes the rest.
    weft_pod(n1, conflist, "stays", "DEL")
    uninstall.run(n1)
    remove_cni.run(n1)
    assert "cni0" not in n1.ns.links() and not lease_dir.exists()
    assert routes(n1) == keep_routes
    assert set(n1.ns.links()) == {"lo", "eth0", "keep0"}
    assert {d: files(host[d]) for d in keep} == keep
    assert tables(n1) == {"inet other"}
    assert n2.routes()  # the other node is not touched
