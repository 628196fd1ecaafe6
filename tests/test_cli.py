"""weftd's command line and environment, run for real in a namespace: every option and every variable given a
value weftd cannot use is refused with exit status 2 and one line on stderr naming it, no traceback, and
nothing changed in the namespace's links, routes and nftables rules (nor in the store).

The bad value of each option comes from its declaration (weftd.options): the first of CANDIDATES its parser
refuses, so an option added later is covered without touching this file; one that takes every candidate
must be listed in FREE, with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab import ROOT, SOCKET_DIR, Node
from weftd import options
from weftd.option import Option
from weftlib.version import version

CANDIDATES = ("", "maybe", "ten", "0", "70000", "x" * 300, "/nonexistent/weft-test", "a b")
# Options that take every string (none today): flag -> why.
FREE: dict[str, str] = {}
EXIT_USAGE = 2


def bad_value(opt: Option) -> str | None:
    for raw in CANDIDATES:
        try:
            opt.convert(raw)
        except ValueError:
            return raw
    return None


def test_every_option_has_a_bad_value_or_is_listed_as_free() -> None:
    for opt in options.declared():
        assert (bad_value(opt) is None) == (opt.flag in FREE), opt.flag


@dataclass
class Setup:
    """A node namespace with an underlay (eth0) and a default route, and the good value of every option that
    would otherwise reach outside the test's directories."""

    node: Node
    env: dict[str, str]

    def weftd(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.node.ns.run(sys.executable, "-m", "weftd", *argv, env=self.env if env is None else env,
                                check=False, timeout=60)

    def state(self) -> dict[str, str]:
        """What weftd could change: links, addresses, routes, nftables, and the store."""
        out = {name: self.node.ns.run(*cmd).stdout for name, cmd in {
            "links": ("ip", "-d", "link", "show"),
            "addresses": ("ip", "addr", "show"),
            "routes": ("ip", "route", "show", "table", "all"),
            "routes6": ("ip", "-6", "route", "show", "table", "all"),
            "nft": ("nft", "list", "ruleset"),
        }.items()}
        store = Path(self.env["WEFTD_STORE_PATH"])
        out["store"] = store.read_text() if store.exists() else ""
        return out

    def start(self) -> subprocess.Popen[str]:
        """`weftd run` with the good settings, until it has written the node's conflist."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.node.ns.name, sys.executable, "-m", "weftd", "run"],
                                env=self.env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        conflist = Path(self.env["WEFTD_CNI_CONF_DIR"]) / "10-weft.conflist"
        deadline = time.monotonic() + 60
        while not conflist.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert conflist.exists(), f"weftd run did not come up: {proc.poll()}"
        return proc


@pytest.fixture
def setup(node: Node) -> Iterator[Setup]:
    ns, d = node.ns, node.dir
    # No IPv6 link-local addresses on any link of the node, weftd's VTEP included: the kernel adds them a
    # second or two after a link comes up, which would change the state compared after weftd stopped.
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.addr_gen_mode=1")
    ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    ns.run("ip", "link", "set", "peer0", "up")
    ns.run("ip", "addr", "add", "10.77.0.1/24", "dev", "eth0")
    ns.run("ip", "link", "set", "eth0", "up")
    ns.run("ip", "route", "add", "default", "via", "10.77.0.254", "dev", "eth0")
    (d / "net-conf.json").write_text(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}))
    (d / "policy").mkdir()
    SOCKET_DIR.mkdir(exist_ok=True)
    good = {"--node-name": "n1", "--store": "file", "--store-path": d / "store.json", "--net-conf": d / "net-conf.json",
            "--iface": "eth0", "--public-ip": "10.77.0.1", "--subnet-file": d / "subnet.env",
            "--cni-conf-dir": d / "net.d", "--ipam-data-dir": d / "ipam",
            "--cni-socket": SOCKET_DIR / f"{ns.name}.sock",
            "--listen": "127.0.0.1:9808", "--state-dir": d / "state", "--wireguard-device": "wt-wg",
            "--kubeconfig": "", "--policy-dir": "", "--policy-kube": "false"}
    base = {k: v for k, v in os.environ.items() if not k.startswith("WEFTD_") and k != "NODE_NAME"}
    env = {**base, **{next(o for o in options.declared() if o.flag == flag).env: str(value)
                      for flag, value in good.items()}}
    yield Setup(node, env)
    (SOCKET_DIR / f"{ns.name}.sock").unlink(missing_ok=True)


def refusals(s: Setup, command: str) -> list[str]:
    """Runs `weftd COMMAND` once per option and per variable with a bad value; what went wrong, if anything."""
    failures = []
    before = s.state()
    for opt in options.for_command(options.declared(), command):
        bad = bad_value(opt)
        if bad is None:
            continue
        runs = [(opt.flag, [f"{opt.flag}={bad}"], s.env)]
        for var in opt.variables:
            env = {k: v for k, v in s.env.items() if k not in opt.variables}
            runs.append((var, [], {**env, var: bad}))
        for named, argv, env in runs:
            p = s.weftd(command, *argv, env=env)
            lines = p.stderr.splitlines()
            if (p.returncode != EXIT_USAGE or len(lines) != 1 or named not in p.stderr or "Traceback" in p.stderr
                    or p.stdout):
                failures.append(f"{named}={bad!r}: exit {p.returncode}, stdout {p.stdout!r}, stderr {p.stderr!r}")
            after = s.state()
            if after != before:
                changed = [k for k in before if before[k] != after[k]]
                failures.append(f"{named}={bad!r} changed {changed}")
                before = after
    return failures


def one_line_refusal(s: Setup, *argv: str, env: dict[str, str] | None = None, seeds_store: bool = False) -> str:
    """`seeds_store`: the check comes after the store is opened, which seeds an empty file store with the
    network config (as any start does); the kernel is still untouched."""
    before = s.state()
    p = s.weftd(*argv, env=env)
    assert p.returncode == EXIT_USAGE and len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    after = s.state()
    if seeds_store:
        before.pop("store"), after.pop("store")
    assert after == before
    return p.stderr


def test_run_refuses_every_bad_option_and_variable_before_it_changes_anything(setup: Setup) -> None:
    assert refusals(setup, "run") == []
    # With the same settings and nothing bad, weftd run does change those things: the check above can fail.
    before = setup.state()
    proc = setup.start()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    after = setup.state()
    assert before["nft"] != after["nft"] and before["links"] != after["links"] and before["store"] != after["store"]
    assert f"weftd {version()} on n1: underlay eth0 10.77.0.1 (MTU 1500), store file" in err.splitlines()[0], err


def test_run_refuses_bad_files_and_addresses_in_one_line(setup: Setup) -> None:
    d = setup.node.dir
    bad_conf = d / "bad-net-conf.json"
    bad_conf.write_text(json.dumps({"Network": "10.244.0.0"}))
    err = one_line_refusal(setup, "run", f"--net-conf={bad_conf}")
    assert f"network config {bad_conf}: Network '10.244.0.0' has no prefix length" in err
    missing = d / "missing.json"
    assert f"--net-conf {missing}: no such file" in one_line_refusal(setup, "run", f"--net-conf={missing}")
    assert f"WEFTD_NET_CONF={missing}: no such file" in one_line_refusal(
        setup, "run", env={**setup.env, "WEFTD_NET_CONF": str(missing)})
    # The default file, absent, with a store that holds no config: the message names both.
    env = {k: v for k, v in setup.env.items() if k != "WEFTD_NET_CONF"}
    env["WEFTD_NET_CONF"] = ""  # not a path: refused as such
    assert "WEFTD_NET_CONF='' is not a path" in one_line_refusal(setup, "run", env=env)
    assert "--policy-dir and --policy-kube" in one_line_refusal(setup, "run", f"--policy-dir={d / 'policy'}",
                                                                "--policy-kube")
    assert "--policy-dir '/nonexistent' does not exist" in one_line_refusal(setup, "run", "--policy-dir=/nonexistent")
    assert "--kubeconfig '/nonexistent/kc' does not exist" in one_line_refusal(setup, "run",
                                                                               "--kubeconfig=/nonexistent/kc")
    garbage = d / "kubeconfig"
    garbage.write_text("clusters: [\n")
    assert f"--policy-kube: kube credentials from --kubeconfig {garbage}: ParserError" in one_line_refusal(
        setup, "run", f"--kubeconfig={garbage}", "--policy-kube")
    assert f"kube credentials from --kubeconfig {garbage}: ParserError" in one_line_refusal(
        setup, "run", f"--kubeconfig={garbage}", "--store=kube")
    assert "--iface nosuch0: no such interface" in one_line_refusal(setup, "run", "--iface=nosuch0", seeds_store=True)
    assert "--public-ip 10.9.9.9: eth0 does not hold it" in one_line_refusal(setup, "run", "--public-ip=10.9.9.9",
                                                                             seeds_store=True)
    # The listen address is bound before anything is changed.
    holder = subprocess.Popen(["ip", "netns", "exec", setup.node.ns.name, sys.executable, "-c",
                               "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', 9808)); s.listen(); "
                               "print('up', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        assert "--listen 127.0.0.1:9808: Address already in use" in one_line_refusal(setup, "run")
    finally:
        holder.kill()
        holder.wait()


def test_missing_default_net_conf_and_empty_store_names_the_file(setup: Setup) -> None:
    env = {k: v for k, v in setup.env.items() if k != "WEFTD_NET_CONF"}
    if Path("/etc/weft/net-conf.json").exists():
        pytest.skip("this machine has a /etc/weft/net-conf.json")
    err = one_line_refusal(setup, "remove-node", env=env)
    assert (f"{setup.env['WEFTD_STORE_PATH']} holds no network config, and the network config "
            "/etc/weft/net-conf.json (--net-conf) does not exist") in err, err


def test_uninstall_and_remove_node_refuse_every_bad_option_and_variable(setup: Setup) -> None:
    proc = setup.start()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert refusals(setup, "uninstall") == []
    assert refusals(setup, "remove-node") == []
    # The same settings, nothing bad: each command changes what the checks above compared.
    before = setup.state()
    assert setup.weftd("remove-node").returncode == 0
    assert setup.state()["store"] != before["store"]
    assert setup.weftd("uninstall").returncode == 0
    after = setup.state()
    assert after["nft"] != before["nft"] and after["links"] != before["links"]


def test_version_and_help(setup: Setup) -> None:
    for argv in (["--version"], ["version"]):
        p = setup.weftd(*argv)
        assert (p.returncode, p.stdout) == (0, f"weftd {version()}\n"), p
    # --help works even with a variable weftd would refuse, and shows each option's default and variable.
    p = setup.weftd("run", "--help", env={**setup.env, "WEFTD_RESYNC": "ten"})
    assert p.returncode == 0 and "--resync SECONDS" in p.stdout, p.stderr
    assert "(default: 10; env WEFTD_RESYNC)" in " ".join(p.stdout.split())


@pytest.mark.parametrize("plugin", ["weft", "weft-py", "weft-ipam"])
def test_plugins_print_their_usage(node: Node, plugin: str) -> None:
    """The plugins take no arguments from a runtime; -h, --help or --version is a person asking. `weft` is the
    shim, which execs weft-py for it. stdin stays open: the answer must not wait for a config."""
    for arg in ("--help", "-h"):
        p = subprocess.run([str(node.bin / plugin), arg], stdin=subprocess.PIPE, capture_output=True, text=True,
                           timeout=30, env={k: v for k, v in os.environ.items() if not k.startswith("CNI_")})
        assert p.returncode == 0 and p.stdout.startswith("usage: weft-"), p
        assert f"(Weft {version()})" in p.stdout and "CNI_COMMAND" in p.stdout
