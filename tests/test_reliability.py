"""Faults, storms, corrupted state, bad input and a soak: nothing leaks, nothing is handed out twice,
and nothing that is refused changes the node."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_plugin.plugin import HANDLERS, PLUGIN
from tests.cluster import MakeCluster
from tests.lab import Node, host_veths, ping, proc_kib, weft_conf, weftd_pid
from weftlib.cni import skel
from weftlib.kernel.netns import NetNS

SEED = int(os.environ.get("WEFT_FAULT_SEED", "20261122"))


def assert_clean(node: Node, network: str) -> None:
    assert host_veths(node) == []
    assert node.reservations(network) == {}
    assert node.masqueraded() == []
    cache = node.cache_dir / "results"
    assert not cache.exists() or [p.name for p in cache.iterdir() if network in p.name] == []


def start_add(node: Node, conf: dict[str, Any], cid: str, netns: str) -> subprocess.Popen[bytes]:
    env = node.env(CNI_COMMAND="ADD", CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME="eth0")
    p = subprocess.Popen(["ip", "netns", "exec", node.ns.name, str(node.bin / "weft")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert p.stdin is not None
    p.stdin.write(json.dumps(conf).encode())
    p.stdin.close()
    return p


def kill_tree(p: subprocess.Popen[bytes]) -> None:
    """SIGKILL the plugin (the child of `ip netns exec`, which execs it, so the same pid)."""
    try:
        os.kill(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(10)


TIMED_ADDS = 5  # ADDs run to the end first, to learn how long an ADD takes here
KILL_RUNS = 40  # ADDs killed at a random point, at least
MIN_MID_ADD = 10  # kills that must land while the ADD still runs
MAX_KILL_RUNS = 160


@pytest.mark.slow
def test_kill_9_at_random_points_of_add_then_del_or_gc_cleans_up(node: Node) -> None:
    """SIGKILL at random points of ADDs, then DEL or GC: nothing leaks. The kills are aimed at the ADD as
    this machine runs it: a few ADDs are timed first, and each kill comes at a random moment of the
    longest of them (but the first, which also creates the bridge). Runs go on, boundedly, until enough
    kills landed mid-ADD: a faster or slower ADD changes how many runs that takes, not the outcome."""
    rng = random.Random(SEED)
    conf = {"cniVersion": "1.1.0", "name": "killnet", **weft_conf("killnet", "10.61.0.0/24", "1.1.0",
                                                                   data_dir=node.data_dir, ipMasq=True)}
    survivors: dict[str, str] = {}

    def finished(cid: str, p: subprocess.Popen[bytes]) -> None:
        assert p.returncode == 0, p.stdout.read() if p.stdout else b""
        survivors[cid] = json.loads(p.stdout.read() if p.stdout else b"{}")["ips"][0]["address"]

    took = []
    for i in range(TIMED_ADDS):
        t = time.monotonic()
        p = start_add(node, conf, f"kill{i}", node.pod(f"k{i}").path)
        p.wait(60)
        took.append(time.monotonic() - t)
        finished(f"kill{i}", p)
    window = max(took[1:])  # the first ADD also creates the bridge
    runs, killed = TIMED_ADDS, 0
    while runs < MAX_KILL_RUNS and (runs < TIMED_ADDS + KILL_RUNS or killed < MIN_MID_ADD):
        cid = f"kill{runs}"
        p = start_add(node, conf, cid, node.pod(f"k{runs}").path)
        time.sleep(rng.uniform(0.0, window))
        if p.poll() is None:
            killed += 1
            kill_tree(p)
        elif p.returncode == 0:
            finished(cid, p)
        runs += 1
        # Whatever the kill left, the lock died with the process: the next ADD must not wait for it.
    print(f"kill -9: {killed} of {runs - TIMED_ADDS} kills landed mid-ADD (timed ADDs: "
          f"{', '.join(f'{t:.3f}' for t in took)} s)")
    assert killed >= MIN_MID_ADD, f"only {killed} of {runs - TIMED_ADDS} kills landed mid-ADD (ADDs took {took})"
    # A kill leaves at most one lease per container, and every ADD that finished owns the address it returned.
    leases = node.reservations("killnet")
    owners = [f.split("\n")[0].strip() for f in leases.values()]
    assert len(owners) == len(set(owners)), f"a container holds two addresses: {sorted(owners)}"
    for cid, address in survivors.items():
        assert leases[address.split("/")[0]].split("\n")[0].strip() == cid, (cid, address)
    # Half the pods go away through DEL, the rest through GC with the survivors as valid attachments.
    for i in range(0, runs, 2):
        out = node.plugin("DEL", conf, cid=f"kill{i}", netns="")
        assert out.rc == 0, out.stdout
    valid = [{"containerID": cid, "ifname": "eth0"} for cid in survivors if int(cid[4:]) % 2]
    gc = node.plugin("GC", {**conf, "cni.dev/valid-attachments": valid})
    assert gc.rc == 0, gc.stdout
    kept = {f.split("\n")[0].strip() for f in node.reservations("killnet").values()}
    assert kept == {v["containerID"] for v in valid}
    assert len(host_veths(node)) == len(valid)
    for v in valid:
        assert node.plugin("DEL", conf, cid=v["containerID"], netns="").rc == 0
    assert_clean(node, "killnet")


@pytest.mark.slow
def test_storm_of_200_pods_in_random_order_with_repeats(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    node = n1.node
    rng = random.Random(SEED)
    pods = {i: node.pod(f"s{i}") for i in range(200)}
    # A runtime serialises the operations on one sandbox; across sandboxes anything goes.
    plans = {i: [rng.choice(("add", "del")) for _ in range(rng.randint(2, 5))] for i in pods}
    order = list(pods)
    rng.shuffle(order)

    def run(i: int) -> list[tuple[str, int, str]]:
        done = []
        for verb in plans[i]:
            out = node.drive(verb, n1.conflist, f"storm{i}", pods[i].path, check=False)
            done.append((verb, out.rc, out.stdout))
        return done

    with ThreadPoolExecutor(16) as pool:
        results = dict(zip(order, pool.map(run, order), strict=True))
    assert not [r for rs in results.values() for r in rs if r[0] == "del" and r[1] != 0]  # DEL always succeeds
    leases = node.reservations("weft")
    owners = [v.split("\n")[0].strip() for v in leases.values()]
    assert len(owners) == len(set(owners)), "a container holds two addresses"
    attached = set()
    for i, rs in results.items():
        for verb, rc, _ in rs:  # a refused ADD (the interface exists) leaves the pod as it was
            if verb == "del":
                attached.discard(f"storm{i}")
            elif rc == 0:
                attached.add(f"storm{i}")
    assert set(owners) == attached
    assert len(host_veths(node)) == len(attached)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: node.drive("del", n1.conflist, f"storm{i}", pods[i].path), pods))
    assert host_veths(node) == [] and node.reservations("weft") == {}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_soak_1000_add_del_cycles_through_weftd(make_cluster: MakeCluster) -> None:
    cycles = int(os.environ.get("WEFT_SOAK_CYCLES", "1000"))
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    node = n1.node
    pod = node.pod("soak")
    pid = weftd_pid(node.socket)
    assert pid is not None
    samples = []
    for i in range(cycles):
        node.drive("add", n1.conflist, f"soak{i}", pod.path)
        node.drive("del", n1.conflist, f"soak{i}", pod.path)
        if i in (cycles // 5, cycles - 1):
            samples.append((fd_count(pid), proc_kib(pid), len(node.ns.links())))
    (fd1, rss1, links1), (fd2, rss2, links2) = samples
    assert fd2 <= fd1 and links2 == links1
    assert rss2 - rss1 < 4096, f"weftd grew from {rss1} to {rss2} KiB over {cycles - cycles // 5} cycles"
    assert host_veths(node) == [] and node.reservations("weft") == {}
    print(f"soak: {cycles} cycles, weftd fds {fd1}->{fd2}, RSS {rss1}->{rss2} KiB")


def test_corrupted_store_files_cause_no_crash_and_no_duplicate(node: Node) -> None:
    conf = {"cniVersion": "1.0.0", "name": "corrupt", **weft_conf("corrupt", "10.62.0.0/29", data_dir=node.data_dir)}
    pods = [node.pod(f"c{i}") for i in range(3)]
    assert node.plugin("ADD", conf, cid="c0", netns=pods[0].path).rc == 0
    store = node.data_dir / "corrupt"
    (store / "10.62.0.2").write_bytes(b"")  # truncated lease: still taken, never handed out again
    (store / "last_reserved_ip.0").write_bytes(b"\xff\xfenot an address")
    (store / "10.62.0.5").write_bytes(b"garbage\x00\x01")
    got = []
    for i in (1, 2):
        out = node.plugin("ADD", conf, cid=f"c{i}", netns=pods[i].path)
        assert out.rc == 0, out.stdout
        got.append(json.loads(out.stdout)["ips"][0]["address"])
    assert not {"10.62.0.2/29", "10.62.0.5/29"} & set(got) and len(set(got)) == 2
    for p in store.iterdir():
        mode = p.stat().st_mode
        assert not mode & stat.S_IWOTH, f"{p} is world-writable"
    assert not store.stat().st_mode & stat.S_IWOTH
    # GC with c1 and c2 valid reclaims the corrupted leases and c0's.
    valid = [{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "eth0"}]
    gc = node.plugin("GC", {**conf, "cniVersion": "1.1.0", "cni.dev/valid-attachments": valid})
    assert gc.rc == 0, gc.stdout
    assert sorted(node.reservations("corrupt")) == sorted(g.split("/")[0] for g in got)


def test_reboot_then_gc_reclaims_leases_of_pods_that_are_gone(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    n1, n2 = c.boot(["n1", "n2"])
    for i in range(3):
        c.pod(n1, f"before{i}")
    leases = n1.node.reservations("weft")
    assert len(leases) == 3
    # Reboot: the node's namespace (links, routes, rules) and its tmpfs state go; /var/lib stays.
    c.stop(n1, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", n1.ns.name], check=True)
    for p in (n1.subnet_file, n1.conflist):
        p.unlink()
    for _, (pod, _) in list(n1.pods.items()):
        subprocess.run(["ip", "netns", "del", pod.name], check=True)
    n1.pods.clear()
    subprocess.run(["ip", "netns", "add", n1.ns.name], check=True)
    n1.ns.run("ip", "link", "set", "lo", "up")
    c.uplink(n1.ns, "eth0", "A", f"{n1.ip}/24")
    c.start(n1)
    c.wait_ready(n1)
    c.until(lambda: len(n1.routes()) == 1, 60, "n1 routes to n2 again", n1)
    after, ip = c.pod(n1, "after")
    _, ip2 = c.pod(n2, "on-n2")
    assert ping(after, ip2)
    assert ip not in leases  # the old leases are still held until GC
    conf = json.loads(n1.conflist.read_text())
    plugin = {**conf["plugins"][0], "cniVersion": "1.1.0", "name": conf["name"],
              "cni.dev/valid-attachments": [{"containerID": "after", "ifname": "eth0"}]}
    gc = n1.node.plugin("GC", plugin)
    assert gc.rc == 0, gc.stdout
    assert list(n1.node.reservations("weft")) == [ip]


def test_peer_flapping_leaves_exactly_one_set_of_entries(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    n1, n2 = c.boot(["n1", "n2"])
    for _ in range(6):
        c.stop(n2)
        subprocess.run(["ip", "netns", "exec", n2.ns.name, sys.executable, "-m", "weftd", "remove-node", "--node-name",
                        "n2", "--store", "file", "--store-path", str(c.dir / "store.json")], check=True,
                       capture_output=True, cwd=Path(__file__).resolve().parent.parent)
        c.until(lambda: n1.routes() == [], 60, "n1 drops n2", n1)
        c.start(n2)
        c.wait_ready(n2)
        c.until(lambda: len(n1.routes()) == 1, 60, "n1 learns n2 again", n1)
    # Two more full rounds, counted by weftd itself, then exactly one set of entries.
    rounds = n1.metric("weft_reconcile_duration_seconds_count")
    c.until(lambda: n1.metric("weft_reconcile_duration_seconds_count") >= rounds + 2, 60, "two more rounds", n1)
    assert len(n1.routes()) == 1
    neigh = n1.ns.ip_json("neigh", "show", "dev", "weft.1")
    fdb = [line for line in n1.ns.run("bridge", "fdb", "show", "dev", "weft.1").stdout.splitlines()
           if "dst" in line]
    assert len(neigh) == 1 and len(fdb) == 1, (neigh, fdb)
    a, _ = c.pod(n1, "a")
    _, b_ip = c.pod(n2, "b")
    assert ping(a, b_ip)


# --- bad input ------------------------------------------------------------------------------------

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSONISH = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids,
                                                                                          max_size=4), max_leaves=12)
ODD = st.sampled_from(["", "../../etc/passwd", "a/b", "..", ".", "x" * 300, "eth0\n", "e\x00th0", "ééé", " ", "-x",
                       "weft0; rm -rf /", "\udcff"])
# Random values for these keys. Not for "name" or "dataDir": a random valid one picks another store,
# where the ADD would rightly succeed (and, for dataDir, write outside the test's directory).
KEYS = ["cniVersion", "type", "bridge", "mtu", "ipMasq", "isGateway", "ipam", "subnet", "ranges", "rangeStart",
        "rangeEnd", "gateway", "routes", "prevResult", "vlan"]


def _base(node: Node) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "fuzz", **weft_conf("fuzz", "10.63.0.0/30", data_dir=node.data_dir)}


def _mutations(node: Node, pod: str) -> st.SearchStrategy[tuple[bytes, dict[str, str]]]:
    env_ok = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "fz", "CNI_NETNS": pod, "CNI_IFNAME": "eth1"}
    base = _base(node)

    def with_value(key: str, value: Any) -> tuple[bytes, dict[str, str]]:
        conf = json.loads(json.dumps(base))
        if key in ("dataDir", "subnet", "rangeStart", "rangeEnd", "gateway", "ranges", "routes"):
            conf["ipam"][key] = value
        else:
            conf[key] = value
        return json.dumps(conf, ensure_ascii=False).encode("utf-8", "surrogatepass"), env_ok

    def with_env(key: str, value: str | None) -> tuple[bytes, dict[str, str]]:
        env = dict(env_ok)
        if value is None:
            env.pop(key)
        else:
            env[key] = value
        return json.dumps(base).encode(), env

    bad_values = st.sampled_from([
        ("cniVersion", "9.9.9"), ("cniVersion", 1), ("cniVersion", None), ("name", "../x"), ("name", ""),
        ("bridge", 7), ("bridge", "a/b"), ("mtu", -1), ("mtu", "1500"), ("ipMasq", "yes"), ("ipam", "weft-ipam"),
        ("subnet", "10.0.0.0/33"), ("subnet", "::/200"), ("rangeStart", "192.168.0.1"), ("dataDir", "../../tmp"),
        ("dataDir", "rel/dir"), ("dataDir", "/a/../../etc"), ("gateway", "10.63.9.9"), ("vlan", 100),
        ("ranges", [[{"subnet": "10.63.0.0/30"}], [{"subnet": "10.63.0.0/30"}]]), ("routes", [{"dst": "nope"}]),
        ("prevResult", {"ips": "x"})])
    return st.one_of(
        st.binary(max_size=200).map(lambda b: (b, env_ok)),  # not JSON, or not an object
        JSONISH.map(lambda v: (json.dumps(v).encode(), env_ok)),
        st.builds(with_value, st.sampled_from(KEYS), JSONISH).filter(lambda c: c[0] != json.dumps(base).encode()),
        bad_values.map(lambda kv: with_value(*kv)),
        st.builds(with_env, st.sampled_from(["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
                  st.none() | ODD),
        st.builds(with_env, st.just("CNI_NETNS"), st.sampled_from(["/nonexistent", "/etc/passwd", "/proc/self/ns/net",
                                                                    "/proc/1/ns/mnt", "relative"])),
        st.builds(with_env, st.just("CNI_IFNAME"), st.just("lo")),  # exists in the pod already
        st.just((b"{" * 5000 + b"}" * 5000, env_ok)),
        st.just((b" " * (2 << 20), env_ok)),
    )


def _state(node: Node) -> tuple[Any, ...]:
    snap = node.snapshot()  # without IPv6 link-local routes, which come on the kernel's own schedule
    return snap["links"], snap["addrs"], snap["routes"], snap["rules"], snap["files"]


@pytest.mark.slow
def test_fuzzed_input_gets_an_error_and_changes_nothing(node: Node) -> None:
    pod = node.pod("fz")
    conf = _base(node)
    # Fill the /30 (one address beside the gateway) so that even a valid-looking ADD finds the range
    # exhausted and changes nothing.
    assert node.plugin("ADD", conf, cid="fill", netns=node.pod("fill").path).rc == 0
    before, settled = _state(node), None
    while settled != before:  # the kernel adds cni0's IPv6 link-local routes a moment after ADD
        time.sleep(1)
        settled, before = before, _state(node)
    outcomes: list[int] = []
    with NetNS(node.ns.path).entered():  # in-process, exactly as weftd runs handed-over invocations

        @settings(max_examples=int(os.environ.get("WEFT_FUZZ_EXAMPLES", "3000")), deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(_mutations(node, pod.path))
        def case(data: tuple[bytes, dict[str, str]]) -> None:
            raw, env = data
            env = {**node.env(), **env}
            out = skel.invoke(PLUGIN, HANDLERS, raw, env)
            assert out.status == 1, (raw[:200], env, out.stdout)
            err = json.loads(out.stdout)
            assert isinstance(err["code"], int) and err["code"] != 0 and err["msg"]
            assert "Traceback" not in out.stdout + out.stderr
            assert err["code"] != 999, err  # an internal error is a bug to fix, not an answer
            outcomes.append(err["code"])

        case()
    after = _state(node)
    assert after == before
    assert len(outcomes) >= 1000 and {1, 4, 6, 7, 11} <= set(outcomes)
    # The executable gives the same for a sample, exit status 1 and nothing on the node.
    for raw, env in [(b"not json", {}), (b"{}", {"CNI_COMMAND": "ADD"}),
                     (json.dumps({**conf, "name": "../x"}).encode(), {}),
                     (json.dumps(conf).encode(), {"CNI_CONTAINERID": "x", "CNI_NETNS": "/etc/passwd"})]:
        full = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "exe", "CNI_NETNS": pod.path, "CNI_IFNAME": "eth1", **env}
        p = node.ns.run(str(node.bin / "weft"), input=raw, env=node.env(**full), check=False)
        assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr and json.loads(p.stdout)["code"]
    assert _state(node) == before


def test_weftd_killed_and_stopped_mid_iperf3_stream(make_cluster: MakeCluster) -> None:
    """A TCP stream across nodes survives weftd's SIGKILL on one end and SIGTERM on the other, and the
    route to the live peer is never withdrawn meanwhile. The stream runs from before the stops until
    both daemons are back, however long that takes."""
    c = make_cluster("vxlan")
    n1, n2 = c.boot(["n1", "n2"])
    a, _ = c.pod(n1, "a")
    b, b_ip = c.pod(n2, "b")
    server = subprocess.Popen(["ip", "netns", "exec", b.name, "iperf3", "-s", "-1", "-B", b_ip],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        c.until(lambda: ":5201 " in b.run("ss", "-Htln").stdout, 60, "the iperf3 server listening")
        # -t 0: until interrupted
        client = subprocess.Popen(["ip", "netns", "exec", a.name, "iperf3", "-c", b_ip, "-t", "0", "-i", "0.5", "-J"],
                                  stdout=subprocess.PIPE, text=True)
        c.until(lambda: len(b.run("ss", "-Htn", "state", "established", "( sport = :5201 )").stdout.splitlines()) >= 2,
                60, "the iperf3 control and data connections")
        time.sleep(1)  # a second of the stream before
        c.stop(n1, signal.SIGKILL)
        c.stop(n2, signal.SIGTERM)
        seen = []
        for _ in range(20):  # both daemons down: the kernel state they left must stay
            seen.append(len(n1.routes()) == 1 and len(n2.routes()) == 1)
            time.sleep(0.1)
        c.start(n1)
        c.start(n2)
        c.wait_ready(n1)
        c.wait_ready(n2)
        time.sleep(1)  # and a second after
        client.send_signal(signal.SIGINT)
        out, _ = client.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
    assert all(seen)
    report = json.loads(out)
    assert report.get("error") == "interrupt - the client has terminated", out[-500:]  # the stop, nothing else
    intervals = [(i["sum"]["bytes"], i["sum"]["seconds"]) for i in report["intervals"]]
    # No half second without data (but the last, which the stop may cut after a few microseconds).
    assert len(intervals) >= 8 and min(n for n, _ in intervals[:-1]) > 0, intervals
    print(f"iperf3 across the restarts: {len(intervals)} intervals, "
          f"{sum(n for n, _ in intervals) * 8 / sum(t for _, t in intervals) / 1e9:.2f} Gbit/s")
