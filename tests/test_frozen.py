"""The frozen bundle (`make build`) as operators install it: no Python on the node.

The chroot test runs the installed binaries in a root that holds the bundle and
glibc's shared objects and nothing else (no interpreter, no shell), and attaches
a real pod from there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.cluster import MakeCluster
from tests.lab import ROOT, Node, install_bundle, ping
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
