"""The compiled `weft` shim (shim/weft-shim.c), which containerd runs for every pod: it hands the
invocation to weftd and relays the answer, or execs `weft-py` when weftd is not there to take it.

The suites that drive `weft` (test_handoff, test_cnidrive, test_errors, test_reliability, ...) already
go through the shim, with and without weftd. Here: the cases only the shim has (no greeting, another
protocol version, weftd killed or silent after it took the request), fuzzed input under ASan and
UBSan, and runs under valgrind. Both sanitizer builds compile with -Werror.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster import ClusterNode, MakeCluster
from tests.lab import ROOT, Node, Outcome, host_veths
from tests.test_handoff import handed_over

SOURCE = ROOT / "shim" / "weft-shim.c"
ASAN_EXIT, UBSAN_EXIT, VALGRIND_EXIT = 86, 87, 97
SANITIZERS = {"ASAN_OPTIONS": f"exitcode={ASAN_EXIT}:detect_leaks=0:abort_on_error=0",
              "UBSAN_OPTIONS": f"halt_on_error=1:exitcode={UBSAN_EXIT}:print_stacktrace=1"}


def shim_build(node: Node, name: str, *flags: str) -> Path:
    """The shim compiled with `flags` into a bin dir of its own, beside links to the same weft-py and
    weft-ipam as the node's (the shim execs the weft-py beside its own executable)."""
    d = node.lab.base / f"shim-{name}"  # not under node.dir, which snapshot() reads
    d.mkdir(exist_ok=True)
    for link in ("weft-py", "weft-ipam"):
        if not (d / link).exists():
            (d / link).symlink_to(os.readlink(node.bin / link))
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", *flags, "-o", str(d / "weft"), str(SOURCE)],
                   check=True, capture_output=True, text=True)
    return d / "weft"


def exe_run(node: Node, exe: Path | list[str], command: str, conf: dict[str, Any] | bytes, cid: str = "c",
            netns: str = "", ifname: str = "eth0", timeout: float = 120, **extra: str) -> Outcome:
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    env = node.env(CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME=ifname, **extra)
    argv = [str(exe)] if isinstance(exe, Path) else exe
    p = node.ns.run(*argv, input=data, env=env, check=False, timeout=timeout)
    return Outcome(p.returncode, p.stdout, p.stderr)


def plugin_conf(cn: ClusterNode, **overrides: Any) -> dict[str, Any]:
    """weftd's own conflist entry for `weft` (with its daemonSocket), as one plugin config."""
    conflist = json.loads(cn.conflist.read_text())
    return {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0], **overrides}


@contextlib.contextmanager
def ipam_locked(cn: ClusterNode, network: str = "weft") -> Iterator[Path]:
    """Holds the lease store's lock, so an ADD inside weftd waits for it mid-request."""
    d = cn.node.data_dir / network
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield d / "lock"
    finally:
        os.close(fd)


def wait_for_lock_waiter(lock: Path, timeout: float = 30) -> None:
    """Until some process waits for `lock` (/proc/locks lists waiters with '->')."""
    inode = os.stat(lock).st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("->" in line and line.split()[-3].endswith(f":{inode}")
               for line in Path("/proc/locks").read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing waited for {lock}")


def start_shim(cn: ClusterNode, command: str, conf: dict[str, Any], cid: str, netns: str,
               **extra: str) -> subprocess.Popen[str]:
    env = cn.node.env(CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME="eth0", **extra)
    p = subprocess.Popen(["ip", "netns", "exec", cn.ns.name, str(cn.node.bin / "weft")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdin is not None
    p.stdin.write(json.dumps(conf))
    p.stdin.close()
    return p


def assert_try_again(p: subprocess.Popen[str], version: str, why: str) -> None:
    p.wait(120)
    assert p.stdout is not None and p.stderr is not None
    out, err = p.stdout.read(), p.stderr.read()
    assert p.returncode == 1, out + err
    reply = json.loads(out)
    assert reply == {"cniVersion": version, "code": 11, "msg": "try again later",
                     "details": f"weftd took the request but did not answer: {why}"}, reply
    assert "try again later" in err


def test_weftd_killed_mid_add_gives_error_11_and_the_add_never_runs_twice(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    pod = n1.node.pod("k")
    conf = plugin_conf(n1, cniVersion="0.4.0")  # the error is in the config's version
    with ipam_locked(n1) as lock:
        p = start_shim(n1, "ADD", conf, "killed", pod.path, WEFT_HANDOFF_TIMEOUT="600")
        wait_for_lock_waiter(lock)  # weftd has the request and is inside the ADD
        t = time.monotonic()
        c.stop(n1, signal.SIGKILL)
        assert_try_again(p, "0.4.0", "connection closed")
        # At once, not after the 600 s timeout (the margin is for a loaded machine, not a speed claim).
        assert time.monotonic() - t < 120
    time.sleep(0.5)
    # Nothing ran the ADD after weftd died: not the shim, not weft-py.
    assert host_veths(n1.node) == [] and n1.node.reservations("weft") == {} and "eth0" not in pod.links()

    # The runtime's retry: DEL (safe whatever weftd did), then ADD, handed to the new weftd.
    c.start(n1)
    c.wait_ready(n1)
    assert exe_run(n1.node, n1.node.bin / "weft", "DEL", conf, "killed", pod.path).rc == 0
    add = exe_run(n1.node, n1.node.bin / "weft", "ADD", conf, "killed", pod.path)
    assert add.rc == 0, add.stdout + add.stderr
    assert handed_over(n1, "ADD") == 1 and len(n1.node.reservations("weft")) == 1
    assert exe_run(n1.node, n1.node.bin / "weft", "DEL", conf, "killed", pod.path).rc == 0
    assert host_veths(n1.node) == [] and n1.node.reservations("weft") == {}


def test_silent_weftd_bounded_waits(make_cluster: MakeCluster) -> None:
    """A weftd that took the request and stays silent: error 11 after WEFT_HANDOFF_TIMEOUT, and weftd's
    own run is the only one. A weftd that never greets (stopped): the shim runs the ADD itself."""
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    conf = plugin_conf(n1)
    a = n1.node.pod("a")
    with ipam_locked(n1) as lock:
        t = time.monotonic()
        p = start_shim(n1, "ADD", conf, "slow", a.path, WEFT_HANDOFF_TIMEOUT="2")
        wait_for_lock_waiter(lock)
        assert_try_again(p, conf["cniVersion"], "timed out")
        assert 2 <= time.monotonic() - t < 45  # after the 2 s asked for, well before the 60 s default
    # weftd finishes the ADD it took (its reply finds the shim gone); nobody else ran it.
    c.until(lambda: len(n1.node.reservations("weft")) == 1, 60, "weftd's ADD to finish", n1)
    assert len(host_veths(n1.node)) == 1 and "eth0" in a.links()
    assert exe_run(n1.node, n1.node.bin / "weft", "DEL", conf, "slow", a.path).rc == 0

    b = n1.node.pod("b")
    assert n1.proc is not None
    n1.proc.send_signal(signal.SIGSTOP)  # the kernel still accepts connections; weftd never greets
    try:
        t = time.monotonic()
        add = exe_run(n1.node, n1.node.bin / "weft", "ADD", conf, "stopped", b.path)
        took = time.monotonic() - t
    finally:
        n1.proc.send_signal(signal.SIGCONT)
    assert add.rc == 0, add.stdout + add.stderr
    assert 5 <= took < 60  # the greeting's 5 s, then weft-py's own ADD
    assert "eth0" in b.links() and handed_over(n1, "ADD") == 1  # only the first one was weftd's
    assert exe_run(n1.node, n1.node.bin / "weft", "DEL", conf, "stopped", b.path).rc == 0
    assert host_veths(n1.node) == [] and n1.node.reservations("weft") == {}


class PeerOfAnotherVersion:
    """A socket whose server greets as `greeting` (another protocol version, or garbage), and records
    whatever a client sends."""

    def __init__(self, path: Path, greeting: bytes) -> None:
        self.path, self.greeting, self.received = path, greeting, b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.sendall(self.greeting)
            conn.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # the shim closes with the greeting's rest unread
                while chunk := conn.recv(65536):
                    self.received += chunk

    def close(self) -> None:
        self.thread.join(15)
        self.sock.close()
        self.path.unlink()


@pytest.mark.parametrize("greeting", [b"WEFT\0\0\0\2", b"WEFT\0\0\0\0", b"HTTP/1.1 400 Bad", b"WE"])
def test_another_protocol_version_gets_nothing_and_the_plugin_runs_locally(node: Node, greeting: bytes) -> None:
    sock = node.dir / "other.sock"
    peer = PeerOfAnotherVersion(sock, greeting)
    pod = node.pod("v")
    conf = {"cniVersion": "1.0.0", "name": "vers", "type": "weft", "bridge": "cni0", "isGateway": True,
            "daemonSocket": str(sock), "ipam": {"type": "weft-ipam", "subnet": "10.35.0.0/24",
                                                "dataDir": str(node.data_dir)}}
    add = exe_run(node, node.bin / "weft", "ADD", conf, "v1", pod.path)
    peer.close()
    assert add.rc == 0, add.stdout + add.stderr
    assert add.json["ips"][0]["address"] == "10.35.0.2/24" and "eth0" in pod.links()
    assert peer.received == b""
    assert exe_run(node, node.bin / "weft", "DEL", conf, "v1", pod.path).rc == 0


def _fuzz_cases(sock: str, pod: str) -> st.SearchStrategy[tuple[bytes, dict[str, str]]]:
    base = {"cniVersion": "1.0.0", "name": "fuzz", "type": "weft", "bridge": "cni9", "isGateway": True,
            "daemonSocket": sock, "ipam": {"type": "weft-ipam", "subnet": "10.36.0.0/24"}}
    text = json.dumps(base)
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    values = st.recursive(scalars, lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=8), v,
                                                                                       max_size=3), max_leaves=8)
    socket_values = st.sampled_from([sock, sock.replace("/", "\\/"), "relative.sock", "", "/nonexistent.sock",
                                     "/" + "x" * 200, sock + "\0", 7, None, [sock], {"path": sock}])

    def mutate(key: str, value: Any, nested: bool) -> bytes:
        conf = json.loads(text)
        if nested:
            conf["ipam"][key] = value
        else:
            conf[key] = value
        return json.dumps(conf).encode()

    configs = st.one_of(
        st.binary(max_size=300),
        st.integers(0, len(text)).map(lambda n: text[:n].encode()),  # truncated
        st.builds(lambda i, b: (text[:i] + b + text[i:]).encode(), st.integers(0, len(text)),
                  st.sampled_from(['"', "\\", "{", "[", "}", "]", ",", ":", "\0", "\u00e9", '"daemonSocket":'])),
        st.builds(mutate, st.sampled_from(["daemonSocket", "cniVersion", "name", "bridge"]), socket_values | values,
                  st.booleans()),
        st.builds(lambda k, v: json.dumps({k: v, **base}).encode(), st.text(max_size=12), values),
        st.builds(lambda d: (text[:-1] + ',"deep":' + "[" * d + "]" * d + "}").encode(), st.integers(1, 100000)),
        st.just(b'{"daemonSocket": "' + sock.encode() + b'", "daemonSocket": 1}'),
        st.just(text.encode() + b" " * (1 << 20)),  # larger than the plugin accepts
    )
    envs = st.fixed_dictionaries({
        "CNI_COMMAND": st.sampled_from(["ADD", "CHECK", "DEL", "VERSION", "GC", "STATUS", "", "add", "BOGUS"]),
        "CNI_NETNS": st.sampled_from([pod, "", "/nonexistent", "/etc/passwd", "/proc/self/ns/net", "rel"]),
        "CNI_CONTAINERID": st.sampled_from(["fz", "", "../x", "a" * 300]),
        "CNI_ARGS": st.sampled_from(["", "IgnoreUnknown=1", "bad"]),
    })
    return st.tuples(configs, envs)


def test_fuzzed_input_to_the_shim_gets_a_coded_error_and_never_a_crash(make_cluster: MakeCluster) -> None:
    """Under ASan and UBSan, with weftd serving: every answer is a CNI error with a code, or a success;
    never a crash, a sanitizer report or a traceback. ADDs use ifname lo, which exists in every pod,
    so nothing is attached."""
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    asan = shim_build(n1.node, "asan", "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                      "-fno-sanitize-recover=undefined")
    pod = n1.node.pod("fz")
    before = n1.node.snapshot()["links"], n1.node.reservations("fuzz")
    codes: list[int] = []

    @settings(max_examples=int(os.environ.get("WEFT_SHIM_FUZZ_EXAMPLES", "250")), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_fuzz_cases(str(n1.node.socket), pod.path))
    def case(data: tuple[bytes, dict[str, str]]) -> None:
        raw, env = data
        p = n1.ns.run(str(asan), input=raw, env=n1.node.env(CNI_IFNAME="lo", **env, **SANITIZERS), check=False)
        assert p.returncode in (0, 1), (raw[:200], env, p.returncode, p.stderr[-3000:])
        assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr and "Traceback" not in p.stderr
        if p.returncode == 1:
            err = json.loads(p.stdout)
            assert isinstance(err["code"], int) and err["code"] not in (0, 999) and err["msg"], err
            codes.append(err["code"])

    case()
    assert len(codes) >= 100 and {1, 4, 6, 7} <= set(codes)
    assert handed_over(n1, "ADD", "error") + handed_over(n1, "DEL") > 0  # weftd served a part of them
    assert (n1.node.snapshot()["links"], n1.node.reservations("fuzz")) == before


def test_shim_under_valgrind(make_cluster: MakeCluster) -> None:
    """Handed over, falling back, refused input and error 11, with memcheck: any error fails the run."""
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    debug = shim_build(n1.node, "valgrind", "-O0", "-g")
    vg = ["valgrind", "-q", f"--error-exitcode={VALGRIND_EXIT}", "--track-origins=yes", str(debug)]
    conf = plugin_conf(n1)
    pod = n1.node.pod("vg")

    def run(command: str, data: dict[str, Any] | bytes, cid: str = "vg", **extra: str) -> Outcome:
        out = exe_run(n1.node, vg, command, data, cid, pod.path, **extra)
        assert out.rc != VALGRIND_EXIT and "==" not in out.stderr, out.stderr
        return out

    add = run("ADD", conf)
    assert add.rc == 0, add.stdout + add.stderr
    check = run("CHECK", {**conf, "prevResult": add.json})
    assert check.rc == 0 and check.stdout == "", check.stdout + check.stderr
    assert handed_over(n1, "ADD") == 1 and handed_over(n1, "CHECK") == 1
    bad = run("ADD", {**conf, "mtu": "big"})
    assert bad.rc == 1 and json.loads(bad.stdout)["code"] == 7 and handed_over(n1, "ADD", "error") == 1
    assert run("ADD", b"{not json").rc == 1  # weft-py's answer, after the shim's exec
    assert json.loads(run("VERSION", b"").stdout)["supportedVersions"][-1] == "1.1.0"
    late_pod = n1.node.pod("late")
    with ipam_locked(n1):
        late = exe_run(n1.node, vg, "ADD", conf, "late", late_pod.path, WEFT_HANDOFF_TIMEOUT="1")
        assert late.rc == 1 and json.loads(late.stdout)["code"] == 11, late.stdout + late.stderr
    c.until(lambda: len(n1.node.reservations("weft")) == 2, 60, "weftd's late ADD", n1)
    assert exe_run(n1.node, vg, "DEL", conf, "late", late_pod.path).rc == 0
    dele = run("DEL", conf)
    assert dele.rc == 0, dele.stdout + dele.stderr
    assert host_veths(n1.node) == [] and n1.node.reservations("weft") == {}

    c.stop(n1)  # no weftd: the shim execs weft-py
    local = run("ADD", conf)
    assert local.rc == 0 and re.match(r"10\.244\.\d+\.\d+/24", local.json["ips"][0]["address"]), local.stdout
    assert run("DEL", conf).rc == 0
    assert host_veths(n1.node) == [] and n1.node.reservations("weft") == {}

