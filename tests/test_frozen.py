"""The frozen bundle (`make build`) as operators install it: no Python on the node.

The chroot test runs the installed binaries in a root that holds the bundle and
glibc's shared objects and nothing else (no interpreter, no shell), and attaches
a real pod from there. The frozen weftd runs each subnet store and policy source
against the real thing: the etcd and kube stores and --policy-kube here, the file
store with --policy-dir in tests/test_netpol.py (test_frozen_weftd_enforces_policy).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.cluster import Cluster, MakeCluster
from tests.kubeapi import KubeAPI
from tests.lab import ROOT, Node, install_bundle, ping, weftd_exe
from tests.test_etcd import etcd_keys
from tests.test_kube import join, kube_store_cluster, weft_token  # noqa: F401 - fixtures
from tests.test_netpol_kube import NP, ApiPods
from tests.test_weftd import pods_on_every_node_talk
from weftd.subnet import kube as kube_store
from weftlib.version import version

INSTALL = ROOT / "packaging" / "install.sh"
EXAMPLE_CONFLIST = ROOT / "conf" / "10-weft.conflist"


def run(exe: Path | str, command: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe)], input=stdin, capture_output=True, text=True,
                          env={"CNI_COMMAND": command, **env}, check=False)


def test_install_is_idempotent_and_uninstall_removes_only_its_own(bundle: Path, tmp_path: Path) -> None:
    lib, cnibin, bindir = tmp_path / "lib" / "weft", tmp_path / "opt" / "cni" / "bin", tmp_path / "bin"
    cnibin.mkdir(parents=True)
    (cnibin / "bridge").symlink_to("/usr/lib/cni/bridge")  # someone else's plugin
    first = install_bundle(bundle, lib, cnibin, bindir)
    assert install_bundle(bundle, lib, cnibin, bindir) == first
    assert [p.name for p in lib.iterdir() if p.name.startswith("bundle-")] == [first.split()[1].rstrip(":")]
    for name in ("weft", "weft-ipam"):
        link = cnibin / name
        assert link.is_symlink() and not os.readlink(link).startswith("/")  # relative: survives host mounts
    assert json.loads(run(cnibin / "weft", "VERSION").stdout)["supportedVersions"][-1] == "1.1.0"
    # `weft` is the compiled shim, static; weft-py, weft-ipam and weftd are the one Python program.
    ldd = subprocess.run(["ldd", str(lib / "current" / "weft")], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    assert (lib / "current" / "weftd").resolve().name == "weft-py"
    # weft-ipam is the same program under another name: it answers as the IPAM plugin.
    out = run(cnibin / "weft-ipam", "ADD", json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": {}}),
              CNI_CONTAINERID="c", CNI_NETNS="/proc/self/ns/net", CNI_IFNAME="eth0")
    assert out.returncode == 1 and "range" in json.loads(out.stdout)["details"].lower()
    assert "usage: weftd" in subprocess.run([str(bindir / "weftd"), "--help"], capture_output=True, text=True).stdout
    # The version is pyproject.toml's, from the package metadata the bundle carries.
    assert subprocess.run([str(bindir / "weftd"), "--version"], capture_output=True, text=True).stdout == \
        f"weftd {version()}\n"
    for plugin in ("weft", "weft-ipam"):  # `weft`, the shim, execs weft-py for it
        usage = subprocess.run([str(cnibin / plugin), "--help"], stdin=subprocess.PIPE, capture_output=True,
                               text=True, timeout=30).stdout
        assert usage.startswith("usage: weft-") and f"(Weft {version()})" in usage, usage

    subprocess.run(["sh", str(INSTALL), "remove", str(lib), str(cnibin), str(bindir)], check=True,
                   capture_output=True)
    assert sorted(p.name for p in cnibin.iterdir()) == ["bridge"]
    assert not lib.exists() and not (bindir / "weftd").exists()


def make(target: str, bundle: Path, destdir: Path) -> str:
    """`make <target> DESTDIR=...` in this checkout, with `bundle` installed as it is (-o build: not rebuilt)."""
    return subprocess.run(["make", "-s", "-C", str(ROOT), "-o", "build", f"BUNDLE={bundle}", f"DESTDIR={destdir}",
                           target], check=True, capture_output=True, text=True).stdout


def test_make_install_never_overwrites_the_conflist_weftd_wrote(bundle: Path, make_cluster: MakeCluster,
                                                                 tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    conf_dir, cnibin = dest / "etc" / "cni" / "net.d", dest / "opt" / "cni" / "bin"
    conflist = conf_dir / EXAMPLE_CONFLIST.name
    c = make_cluster("host-gw")
    n1 = c.add_node("n1")
    c.start(n1, "--cni-conf-dir", str(conf_dir))  # the last --cni-conf-dir counts: weftd writes into the tree
    c.until(lambda: conflist.exists() and n1.http("/healthz")[0] == 200, 120, "n1 ready", n1)
    c.stop(n1)  # so that nothing puts the file back: what make install does to it stays
    written, before = conflist.read_bytes(), conflist.stat()
    assert b'"daemonSocket"' in written and written != EXAMPLE_CONFLIST.read_bytes()

    out = make("install", bundle, dest)
    assert f"{conflist} exists: left as it is" in out, out
    after = conflist.stat()
    assert conflist.read_bytes() == written
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (before.st_ino, before.st_mtime_ns, before.st_mode)
    assert (cnibin / "weft").resolve() == (dest / "usr" / "local" / "lib" / "weft" / "current" / "weft").resolve()
    assert not [p.name for p in conf_dir.iterdir() if p.name != conflist.name]  # no temporary file left
    # make uninstall removes the plugins and leaves weftd's conflist too (`weftd uninstall` removes it).
    make("uninstall", bundle, dest)
    assert conflist.read_bytes() == written and not (cnibin / "weft").exists()

    # A tree without one gets the example; make uninstall removes it again.
    fresh = tmp_path / "fresh"
    make("install", bundle, fresh)
    example = fresh / "etc" / "cni" / "net.d" / EXAMPLE_CONFLIST.name
    assert example.read_bytes() == EXAMPLE_CONFLIST.read_bytes() and example.stat().st_mode & 0o777 == 0o644
    make("uninstall", bundle, fresh)
    assert not example.exists()


def test_frozen_weftd_knows_every_backend_and_store(bundle: Path, tmp_path: Path) -> None:
    """Backends and stores register themselves from the modules of their package; the bundle must hold
    and find them all, as the source tree does."""
    from weftd import backend, subnet

    usage = subprocess.run([str(bundle / "weftd"), "run", "--help"], capture_output=True, text=True).stdout
    assert f"--store {{{','.join(sorted(subnet.types()))}}}" in usage, usage
    conf = tmp_path / "net-conf.json"
    conf.write_text(json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "bogus"}}))
    out = subprocess.run([str(bundle / "weftd"), "remove-node", "--store", "file", "--store-path",
                          str(tmp_path / "store.json"), "--net-conf", str(conf)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"must be one of {tuple(sorted(backend.types()))}" in out.stderr, out.stderr


def _glibc_for(bundle: Path) -> set[Path]:
    """The shared objects from the system that the bundle's ELF files load: glibc's, and zlib for the
    bootloader (weft-py), which starts before it points the loader at the bundle. The `weft` shim
    is static and loads none."""
    libs: set[Path] = set()
    for f in [bundle / "weft-py", *bundle.rglob("*.so*")]:
        if not f.is_file() or f.is_symlink():
            continue
        env = {} if f == bundle / "weft-py" else {"LD_LIBRARY_PATH": str(bundle / "_internal")}
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True, env=env).stdout
        for line in out.splitlines():
            parts = line.split()
            path = next((Path(p) for p in parts if p.startswith("/")), None)
            if path is not None and not str(path).startswith(str(bundle)):
                libs.add(path)
    return libs


def test_frozen_plugin_attaches_a_pod_from_a_root_without_python(bundle: Path, node: Node, tmp_path: Path) -> None:
    root = tmp_path / "root"
    install_bundle(bundle, root / "usr" / "lib" / "weft", root / "opt" / "cni" / "bin")
    for lib in _glibc_for(bundle):
        dest = root / str(lib).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dest)
    for d in ("proc", "run/netns", "var/lib/cni", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    others = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and "/usr/lib/weft/" not in str(p)]
    assert others and not [p for p in others if ".so" not in p.name]  # only shared objects beside the bundle
    assert not [p for p in root.rglob("python*") if p.is_file() and os.access(p, os.X_OK)]
    assert not (root / "bin").exists() and not (root / "usr" / "bin").exists()

    pod = node.pod("chrooted")
    conf = json.dumps({"cniVersion": "1.0.0", "name": "frozen", "type": "weft", "bridge": "cni0",
                       "isGateway": True, "ipam": {"type": "weft-ipam", "subnet": "10.33.0.0/24"}})
    enter = ('mount --bind /proc "$R/proc" && mount --rbind /run/netns "$R/run/netns" && '
             'exec chroot "$R" /opt/cni/bin/weft')

    def chrooted(command: str) -> subprocess.CompletedProcess[str]:
        return node.ns.run("unshare", "-m", "sh", "-c", enter, input=conf, check=False,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "R": str(root), "CNI_COMMAND": command,
                                "CNI_CONTAINERID": "frozen1", "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0",
                                "CNI_PATH": "/opt/cni/bin"})

    add = chrooted("ADD")
    assert add.returncode == 0, add.stdout + add.stderr
    ip = json.loads(add.stdout)["ips"][0]["address"]
    assert ip == "10.33.0.2/24"
    assert (root / "var/lib/cni/networks/frozen/10.33.0.2").read_text().startswith("frozen1")
    assert ping(pod, "10.33.0.1")
    assert chrooted("CHECK").returncode == 1  # a CHECK without prevResult is refused, as the spec says
    dele = chrooted("DEL")
    assert dele.returncode == 0, dele.stdout + dele.stderr
    assert "eth0" not in pod.links() and not (root / "var/lib/cni/networks/frozen/10.33.0.2").exists()


def test_the_bundle_holds_every_module_weft_loads(bundle: Path) -> None:
    """packaging/check_bundle.py, which `make build` runs, on this bundle: every module Weft's code and
    its lazy imports load is in it."""
    out = subprocess.run([sys.executable, str(ROOT / "packaging" / "check_bundle.py"), str(bundle)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def node_subnets(c: Cluster) -> dict[str, str]:
    """Each node's pod subnet as it wrote it, in its state file and in its conflist (which must agree)."""
    out = {}
    for cn in c.nodes.values():
        subnet = str(ipaddress.ip_interface(cn.state()["WEFT_SUBNET"]).network)
        ipam = json.loads(cn.conflist.read_text())["plugins"][0]["ipam"]
        assert ipam["subnet"] == subnet, (cn.name, ipam)
        out[cn.name] = subnet
    return out


def routes_to_peers(c: Cluster, subnets: dict[str, str]) -> bool:
    """Whether each node of `subnets` routes to every other one's subnet, and to nothing else."""
    return all({r["dst"] for r in c.nodes[name].routes()} == {s for peer, s in subnets.items() if peer != name}
               for name in subnets)


def test_frozen_weftd_on_the_etcd_store(make_cluster: MakeCluster, bundle: Path) -> None:
    """The etcd store (etcd3gw over requests) in the frozen weftd, against a real etcd: each node leases a
    subnet, writes its conflist and routes to the others'; pods reach each other; the frozen
    `weftd remove-node` deletes a lease and the others drop its route."""
    c = make_cluster("vxlan", store="etcd")
    c.weftd = weftd_exe(bundle)
    c.start_etcd()
    n1, _, n3 = c.boot()
    subnets = node_subnets(c)
    leases = {str(v["Node"]): k.rsplit("/", 1)[1].replace("-", "/")  # type: ignore[index]
              for k, v in etcd_keys(c).items() if "/subnets/" in k}
    assert leases == subnets and len(set(subnets.values())) == 3
    assert routes_to_peers(c, subnets)
    pods_on_every_node_talk(c)

    c.stop(n3)
    n1.ns.run(*c.weftd, "remove-node", "--node-name", "n3", *c.store_args())
    del subnets["n3"]
    c.until(lambda: routes_to_peers(c, subnets), 60, "n1 and n2 drop n3's route")
    assert "n3" not in json.dumps(etcd_keys(c))


def test_frozen_weftd_as_the_daemonset_runs_it(kube_api: KubeAPI, make_cluster: MakeCluster,
                                               weft_token: str, bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    """The kube store and NetworkPolicy from the API server (--policy-kube) in the frozen weftd, with the
    credentials the DaemonSet's pods have (conf/kube-weft.yml: its ServiceAccount's token, no kubeconfig):
    each node takes its Node's podCIDR, writes its conflist, annotates its Node and routes to the other's
    subnet; a policy from the API server denies, and its deletion allows again."""
    kube = kube_api
    with kube_store_cluster(kube, make_cluster, weft_token, "vxlan") as c:
        c.kubeconfig = None
        c.weftd = kube.as_pod(weftd_exe(bundle), weft_token, tmp_path / "pod")
        n1 = join(kube, c, "n1", "10.244.1.0/24")
        n2 = join(kube, c, "n2", "10.244.2.0/24")
        subnets = node_subnets(c)
        assert subnets == {"n1": "10.244.1.0/24", "n2": "10.244.2.0/24"}
        c.until(lambda: routes_to_peers(c, subnets), 60, "routes between n1 and n2")
        for cn in (n1, n2):
            assert kube.node(cn.name)["metadata"]["annotations"][kube_store.ANN_IP] == cn.ip

        pods = ApiPods(kube)
        for ns in ("x", "y"):
            kube.create_namespace(ns, {"ns": ns})
        try:
            pods.add("x", "a", n1)
            pods.add("x", "b", n2)
            pods.add("y", "a", n2)
            c.until(lambda: pods.table() == pods.everyone(), 60, "every pod reaches every pod")
            status, obj = kube.request("POST", NP.format("x"), {
                "metadata": {"name": "from-y"},
                "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}})
            assert status == 201, obj
            want = {**pods.everyone(), ("x/b", "x/a"): False}
            c.until(lambda: pods.table() == want, 60, "x/a reachable only from y", n1)
            assert kube.request("DELETE", NP.format("x") + "/from-y")[0] == 200
            c.until(lambda: pods.table() == pods.everyone(), 60, "the policy gone", n1)
        finally:
            pods.close()
            for ns in ("x", "y"):
                kube.delete_namespace(ns)
