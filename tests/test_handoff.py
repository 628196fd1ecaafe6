"""The `weft` executable hands invocations to weftd when the conflist names its socket, and runs
them itself when weftd is stopped, killed or absent. Both paths must give the same answers."""

from __future__ import annotations

import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.cluster import ClusterNode, MakeCluster
from tests.lab import Node, cnidrive_path, host_veths, ping, weft_conf
from weftd.cniserver import CniServer
from weftd.metrics import Metrics
from weftd.pod import Attachment, Refused
from weftlib.kernel.netlink import host_veth_name
from weftlib.kernel.netns import NetNS


def handed_over(cn: ClusterNode, command: str, result: str = "ok") -> int:
    _, body = cn.http("/metrics")
    m = re.search(rf'^weft_cni_requests_total{{command="{command}",result="{result}"}} (\S+)$', body, re.M)
    return int(float(m.group(1))) if m else 0


def test_weftd_serves_the_plugin_and_the_plugin_runs_alone_without_it(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    assert json.loads(n1.conflist.read_text())["plugins"][0]["daemonSocket"] == str(n1.node.socket)

    a, _ = c.pod(n1, "a")
    assert handed_over(n1, "ADD") == 1
    n1.node.drive("check", n1.conflist, "a", a.path)
    assert handed_over(n1, "CHECK") == 1

    c.stop(n1)  # SIGTERM: weftd removes its socket, the plugin runs on its own
    assert not n1.node.socket.exists()
    _, b_ip = c.pod(n1, "b")
    assert ping(a, b_ip)

    c.start(n1)
    c.wait_ready(n1)
    c.stop(n1, signal.SIGKILL)  # the socket stays behind and refuses connections
    assert n1.node.socket.exists()
    c.pod(n1, "c")
    n1.node.drive("del", n1.conflist, "c", n1.pods["c"][0].path)

    c.start(n1)
    c.wait_ready(n1)
    for cid in ("a", "b"):
        n1.node.drive("del", n1.conflist, cid, n1.pods[cid][0].path)
    assert handed_over(n1, "DEL") == 2 and handed_over(n1, "ADD") == 0  # counters restart with weftd
    assert host_veths(n1.node) == [] and n1.node.reservations("weft") == {}


def test_netns_reaches_weftd_as_a_descriptor(make_cluster: MakeCluster) -> None:
    """containerd's path of the pod netns need not exist where weftd runs: the plugin passes it open."""
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    pod = n1.node.pod("hidden")
    hidden = n1.node.dir / "hidden-netns"
    hidden.touch()  # in weftd's mount namespace this stays an empty file
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    p = n1.ns.run("sh", "-c", script, "sh", pod.path, str(hidden), cnidrive_path(), "add", str(n1.conflist),
                  "hid", str(hidden), "eth0", env=n1.node.env(), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads(p.stdout)
    assert result["interfaces"][2]["sandbox"] == str(hidden)
    ip = result["ips"][0]["address"].split("/")[0]
    assert any(a["local"] == ip for a in pod.ip_json("addr", "show", "eth0")[0]["addr_info"])
    assert handed_over(n1, "ADD") == 1
    n1.node.drive("del", n1.conflist, "hid", "")
    assert host_veths(n1.node) == [] and n1.node.reservations("weft") == {}


def _bad_inputs(cn: ClusterNode, sock: str, pod_path: str) -> list[tuple[str, dict[str, object], dict[str, str]]]:
    base = json.loads(cn.conflist.read_text())
    plugin = {**base["plugins"][0], "cniVersion": "1.0.0", "name": "weft", "daemonSocket": sock}
    env = {"CNI_CONTAINERID": "bad", "CNI_NETNS": pod_path, "CNI_IFNAME": "eth0"}
    ipam = dict(plugin["ipam"])
    return [
        ("ADD", {**plugin, "cniVersion": "9.9.9"}, env),
        ("ADD", {**plugin, "name": "../etc"}, env),
        ("ADD", {**plugin, "bridge": 7}, env),
        ("ADD", {**plugin, "mtu": "big"}, env),
        ("ADD", {**plugin, "ipam": {**ipam, "subnet": "10.0.0.0/33"}}, env),
        ("ADD", {**plugin, "ipam": {**ipam, "rangeStart": "192.168.1.5"}}, env),
        ("ADD", plugin, {**env, "CNI_IFNAME": "lo"}),  # exists in the pod already
        ("ADD", plugin, {**env, "CNI_IFNAME": "a/b"}),
        ("ADD", plugin, {**env, "CNI_CONTAINERID": "../x"}),
        ("CHECK", plugin, env),  # no prevResult
        ("GC", plugin, env),  # 1.0.0 config
        ("STATUS", {**plugin, "cniVersion": "0.4.0"}, env),
    ]


def test_refusals_are_the_same_from_weftd_and_from_the_plugin(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    pod = n1.node.pod("p")
    def state() -> tuple[object, ...]:
        snap = n1.node.snapshot()  # weftd's own log and routes change meanwhile; the rest must not
        return snap["links"], snap["addrs"], snap["rules"], n1.node.reservations("weft"), pod.links()

    before = state()
    served = []
    for cmd, conf, env in _bad_inputs(n1, str(n1.node.socket), pod.path):
        count = handed_over(n1, cmd, "error")
        served.append(_outcome(n1, cmd, conf, env))
        assert handed_over(n1, cmd, "error") == count + 1, f"{cmd} {served[-1]} was not handed over"
    alone = [_outcome(n1, cmd, conf, env) for cmd, conf, env in _bad_inputs(n1, "/nonexistent.sock", pod.path)]
    assert served == alone

    for rc, out in served:
        assert rc != 0 and "Traceback" not in out and json.loads(out)["code"] in (1, 2, 4, 7)
    assert state() == before


def _outcome(cn: ClusterNode, command: str, conf: dict[str, object], env: dict[str, str]) -> tuple[int, str]:
    out = cn.node.plugin(command, conf, **{k.removeprefix("CNI_").lower(): v for k, v in env.items()
                                           if k != "CNI_CONTAINERID"}, cid=env["CNI_CONTAINERID"])
    return out.rc, out.stdout


def test_concurrent_adds_and_dels_through_weftd(make_cluster: MakeCluster) -> None:
    n = 40
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    pods = [n1.node.pod(f"p{i}") for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        adds = list(pool.map(lambda i: n1.node.drive("add", n1.conflist, f"c{i}", pods[i].path, check=False),
                             range(n)))
    assert [a.stdout + a.stderr for a in adds if a.rc != 0] == []
    assert len({a.json["ips"][0]["address"] for a in adds}) == n
    assert handed_over(n1, "ADD") == n and len(host_veths(n1.node)) == n
    with ThreadPoolExecutor(n) as pool:
        dels = list(pool.map(lambda i: n1.node.drive("del", n1.conflist, f"c{i}", pods[i].path, check=False),
                             range(n)))
    assert [d.stderr for d in dels if d.rc != 0] == []
    assert handed_over(n1, "DEL") == n
    assert host_veths(n1.node) == [] and n1.node.reservations("weft") == {}


def test_socket_is_private_to_root(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    (n1,) = c.boot(["n1"])
    assert Path(n1.node.socket).stat().st_mode & 0o777 == 0o600
    probe = ("import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
             "s.sendall(b'x'*8);print(repr(s.recv(10)))")
    p = n1.ns.run("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "python3", "-c", probe,
                  str(n1.node.socket), check=False)
    assert p.returncode != 0 and "Permission denied" in p.stderr


def test_the_hook_is_told_of_each_pod_and_an_add_it_refuses_is_undone(node: Node, tmp_path: Path) -> None:
    """weftd's CNI server runs the invocation, then tells its hook of the pod as one typed value, before the
    reply; an ADD the hook refuses is undone (nothing of the pod stays) and fails with TRY_AGAIN and the
    hook's words. Run in-process, in the node's namespace."""
    told: list[Attachment] = []
    gone: list[str] = []

    class Hook:
        def attached(self, pod: Attachment) -> None:
            told.append(pod)
            if pod.name == "refused":
                raise Refused("NetworkPolicy could not be applied for this pod: no verdicts for it")

        def detached(self, container_id: str) -> None:
            gone.append(container_id)

    server = CniServer(tmp_path / "cni.sock", Metrics(), Hook())
    raw = json.dumps(weft_conf(data_dir=node.data_dir)).encode()
    pods = {name: node.pod(name) for name in ("kept", "refused")}

    def invoke(command: str, name: str) -> tuple[int, dict[str, object]]:
        env = node.env(CNI_COMMAND=command, CNI_CONTAINERID=name, CNI_NETNS=pods[name].path, CNI_IFNAME="eth0",
                       CNI_ARGS=f"K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={name}")
        with NetNS(node.ns.path) as handle, handle.entered():
            outcome = server.invoke(raw, env, None)
        return outcome.status, json.loads(outcome.stdout) if outcome.stdout else {}

    status, kept = invoke("ADD", "kept")
    assert status == 0 and told[0].host_veth == host_veth_name("kept", "eth0") == kept["interfaces"][1]["name"]
    assert (told[0].namespace, told[0].name, told[0].container_id, told[0].ifname) == ("ns1", "kept", "kept", "eth0")
    assert [str(a) for a in told[0].addresses] == [ip["address"] for ip in kept["ips"]]

    status, err = invoke("ADD", "refused")
    assert status == 1 and err["code"] == 11
    assert err["details"] == "NetworkPolicy could not be applied for this pod: no verdicts for it"
    assert told[1].name == "refused" and "eth0" not in pods["refused"].links()
    assert host_veths(node) == [host_veth_name("kept", "eth0")]
    assert list(node.reservations("weftnet").values()) == ["kept\r\neth0"]

    assert invoke("DEL", "kept")[0] == 0 and gone == ["kept"]
    assert host_veths(node) == [] and node.reservations("weftnet") == {}
