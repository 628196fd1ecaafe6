"""weftd on several simulated nodes: vxlan, host-gw and direct routing, reconciliation, restarts, NAT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.cluster import OUTSIDE_IP, Cluster, ClusterNode, MakeCluster
from tests.lab import ROOT, Pinger, assert_path_mtu, peer_address, ping, weft_conf
from weftlib.cni.handoff import SOCKET_KEY

EXAMPLE_CONFLIST = ROOT / "conf" / "10-weft.conflist"


def all_pods_reach_each_other(c: Cluster) -> None:
    pods = [pod for cn in c.nodes.values() for pod in cn.pods.values()]
    for ns, _ in pods:
        for _, ip in pods:
            assert ping(ns, ip), f"{ns.name} cannot reach {ip}"


def pods_on_every_node_talk(c: Cluster, mtu: int | None = None) -> None:
    """A pod on every node, and all of them reach each other; with `mtu`: n1's pod has that MTU and
    reaches n2's pod with packets that fill it, not one byte more."""
    for cn in c.nodes.values():
        c.pod(cn, f"pod-{cn.name}")
    all_pods_reach_each_other(c)
    if mtu is not None:
        a, _ = c.nodes["n1"].pods["pod-n1"]
        _, b_ip = c.nodes["n2"].pods["pod-n2"]
        assert a.links()["eth0"]["mtu"] == mtu
        assert_path_mtu(a, b_ip, mtu)


def test_vxlan_three_nodes(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    n1, n2, n3 = c.boot()
    vtep = n1.ns.ip_json("-d", "link", "show", "weft.1")[0]
    data = vtep["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["learning"], vtep["mtu"]) == (1, 8472, False, 1450)
    assert n1.state()["WEFT_MTU"] == "1450"
    routes = {r["dst"]: r for r in n1.routes()}
    for peer in (n2, n3):
        subnet = peer.state()["WEFT_SUBNET"].replace(".1/", ".0/")
        r = routes[subnet]
        assert r["dev"] == "weft.1" and r["gateway"] == subnet.split("/")[0] and "onlink" in r["flags"]
    neigh = n1.ns.ip_json("neigh", "show", "dev", "weft.1")
    assert len(neigh) == 2 and all("PERMANENT" in n["state"] for n in neigh)
    fdb = n1.ns.run("bridge", "fdb", "show", "dev", "weft.1").stdout
    assert fdb.count("permanent") == 2 and "192.168.77.11" in fdb and "192.168.77.12" in fdb
    pods_on_every_node_talk(c, mtu=1450)


def test_host_gw_three_nodes(make_cluster: MakeCluster) -> None:
    c = make_cluster("host-gw")
    n1, n2, n3 = c.boot()
    assert "weft.1" not in n1.ns.links()
    assert {r["gateway"] for r in n1.routes()} == {n2.ip, n3.ip}
    assert all(r["dev"] == "eth0" for r in n1.routes())
    assert n1.state()["WEFT_MTU"] == "1500"
    pods_on_every_node_talk(c)


def test_direct_routing_uses_host_gw_on_link_and_vxlan_beyond(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan", two_segments=True, DirectRouting=True)
    n1, n2, n3 = c.boot(segments={"n3": "B"})
    by_gw = {r["dst"]: (r.get("gateway"), r["dev"]) for r in n1.routes()}
    sub2 = n2.state()["WEFT_SUBNET"].replace(".1/", ".0/")
    sub3 = n3.state()["WEFT_SUBNET"].replace(".1/", ".0/")
    assert by_gw[sub2] == (n2.ip, "eth0")
    assert by_gw[sub3] == (sub3.split("/")[0], "weft.1")
    assert len(n1.ns.ip_json("neigh", "show", "dev", "weft.1")) == 1
    pods_on_every_node_talk(c)


def test_host_gw_peer_not_on_link_is_reported(make_cluster: MakeCluster) -> None:
    c = make_cluster("host-gw", two_segments=True)
    n1 = c.add_node("n1")
    n3 = c.add_node("n3", "B")
    for cn in (n1, n3):
        c.start(cn)
    for cn in (n1, n3):
        c.wait_ready(cn)
    c.until(lambda: "weft_peers_unreachable 1.0" in n1.http("/metrics")[1], 60, "unreachable metric", n1)
    assert "is not on-link" in n1.log.read_text()
    assert n1.routes() == []


def test_removed_node_disappears_everywhere(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    n1, n2, n3 = c.boot()
    c.stop(n3)
    subprocess.run([sys.executable, "-m", "weftd", "remove-node", "--node-name", "n3", *c.store_args()], check=True,
                   capture_output=True)
    for cn in (n1, n2):
        c.until(lambda cn=cn: len(cn.routes()) == 1, 60, f"{cn.name} drops n3", cn)
        assert n3.ip not in cn.ns.run("bridge", "fdb", "show", "dev", "weft.1").stdout
        assert len(cn.ns.ip_json("neigh", "show", "dev", "weft.1")) == 1


def test_restart_keeps_pod_traffic_flowing(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    n1, n2, _ = c.boot()
    a, _ = c.pod(n1, "a")
    _, b_ip = c.pod(n2, "b")
    with Pinger(a, b_ip, 0.01) as pings:  # from before the stops until both are ready again, however long
        c.stop(n1, signal.SIGKILL)
        c.stop(n2, signal.SIGTERM)
        c.start(n1)
        c.start(n2)
        c.wait_ready(n1)
        c.wait_ready(n2)
    assert pings.sent > 1 and pings.failures() == [], "".join(pings.lines)[-300:]


def test_reconciliation_repairs_drift_and_leaves_foreign_entries(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    n1, n2, _ = c.boot()
    a, _ = c.pod(n1, "a")
    _, b_ip = c.pod(n2, "b")
    sub2 = n2.state()["WEFT_SUBNET"].replace(".1/", ".0/")
    # Foreign state: a static route, a neighbour on eth0. Weft must not touch them.
    n1.ns.run("ip", "route", "add", "198.51.100.0/24", "via", "192.168.77.200")
    n1.ns.run("ip", "neigh", "add", "192.168.77.99", "lladdr", "02:00:00:00:00:99", "dev", "eth0")
    n1.ns.run("ip", "route", "del", sub2)
    c.until(lambda: any(r["dst"] == sub2 for r in n1.routes()), 60, "route restored", n1)
    # A stray route of Weft's own protocol, for a subnet no peer has, goes away.
    n1.ns.run("ip", "route", "add", "10.244.200.0/24", "via", "192.168.77.11", "proto", "119")
    c.until(lambda: all(r["dst"] != "10.244.200.0/24" for r in n1.routes()), 60, "stray route removed", n1)
    # A VTEP deleted behind weftd's back comes back with every entry.
    n1.ns.run("ip", "link", "del", "weft.1")
    c.until(lambda: len(n1.routes()) == 2 and len(n1.ns.ip_json("neigh", "show", "dev", "weft.1")) == 2,
            60, "VTEP refilled", n1)
    assert ping(a, b_ip)
    assert "198.51.100.0/24" in n1.ns.run("ip", "route").stdout
    assert "192.168.77.99" in n1.ns.run("ip", "neigh", "show", "dev", "eth0").stdout


def test_node_that_vanished_while_weftd_was_down(make_cluster: MakeCluster) -> None:
    c = make_cluster("host-gw")
    n1, _, n3 = c.boot()
    c.stop(n1)
    c.stop(n3)
    subprocess.run([sys.executable, "-m", "weftd", "remove-node", "--node-name", "n3", *c.store_args()], check=True,
                   capture_output=True)
    assert len(n1.routes()) == 2  # stopping weftd left the routes in place
    c.start(n1)
    c.wait_ready(n1)
    assert len(n1.routes()) == 1


def test_outbound_nat_but_never_between_pods(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    n1, n2, _ = c.boot()
    a, a_ip = c.pod(n1, "a")
    b, b_ip = c.pod(n2, "b")
    assert peer_address(c.outside, OUTSIDE_IP, a) == n1.ip
    assert peer_address(b, b_ip, a) == a_ip
    rules = n1.ns.run("nft", "list", "table", "inet", "weft").stdout
    assert "masquerade" in rules and "10.244.0.0/16" in rules


def test_weftd_and_plugin_share_the_nat_table_and_remove_only_their_own(make_cluster: MakeCluster) -> None:
    """weftd's per-network NAT and the plugin's per-pod ipMasq are elements of one table, each tagged
    with its owner: uninstall removes weftd's and keeps the table while a pod's are there."""
    c = make_cluster("host-gw")
    n1 = c.add_node("n1")
    c.start(n1)
    c.wait_ready(n1)
    owners = {owner for _, _, owner in n1.node.nat_elements()}
    assert owners == {"weftd"}, n1.node.nat_elements()
    pod = n1.node.pod("masq")
    conf = weft_conf(network="masqnet", subnet="10.23.0.0/24", data_dir=n1.node.data_dir, ipMasq=True)
    assert n1.node.plugin("ADD", conf, cid="m1", netns=pod.path).rc == 0
    assert n1.node.masqueraded() == ["10.23.0.2"]
    c.stop(n1)
    c.uninstall(n1)
    assert "weftd" not in {owner for _, _, owner in n1.node.nat_elements()}
    assert n1.node.masqueraded() == ["10.23.0.2"]
    assert n1.node.plugin("DEL", conf, cid="m1", netns="").rc == 0
    assert n1.node.nat_elements() == []


def test_legacy_iptables_node_uses_python_iptables_and_uninstall_cleans_up(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    n1 = c.add_node("n1")
    n2 = c.add_node("n2")
    # kubelet on a legacy-mode node leaves this hint chain (KEP-3178); weftd must follow it.
    n1.ns.run("iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
    for cn in (n1, n2):
        c.start(cn)
    for cn in (n1, n2):
        c.wait_ready(cn)
    legacy = n1.ns.run("iptables-legacy-save", "-t", "nat").stdout
    assert ":WEFT-POSTRTG" in legacy and "MASQUERADE" in legacy and "-j WEFT-POSTRTG" in legacy
    assert "-j WEFT-FWD" in n1.ns.run("iptables-legacy-save", "-t", "filter").stdout
    assert n1.ns.run("nft", "list", "table", "inet", "weft", check=False).returncode != 0
    a, _ = c.pod(n1, "a")
    assert peer_address(c.outside, OUTSIDE_IP, a) == n1.ip
    # Drift in the legacy chains is repaired too.
    n1.ns.run("iptables-legacy", "-t", "nat", "-F", "WEFT-POSTRTG")
    c.until(lambda: "MASQUERADE" in n1.ns.run("iptables-legacy-save", "-t", "nat").stdout, 60, "chain refilled", n1)

    c.stop(n1)
    n1.node.drive("del", n1.conflist, "a", a.path)
    c.uninstall(n1)
    assert "WEFT" not in n1.ns.run("iptables-legacy-save").stdout
    assert "weft.1" not in n1.ns.links()
    assert n1.routes() == []
    assert not n1.conflist.exists() and not n1.subnet_file.exists()
    assert ":KUBE-IPTABLES-HINT" in n1.ns.run("iptables-legacy-save", "-t", "mangle").stdout


def test_health_and_metrics(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan")
    n1, _, _ = c.boot()
    code, body = n1.http("/healthz")
    assert code == 200 and body.strip() == "ok"
    _, metrics = n1.http("/metrics")
    for line in ("weft_peers 2.0", "weft_routes 2.0", "weft_neighbours 2.0", "weft_fdb_entries 2.0",
                 "weft_store_up 1.0", "weft_peers_unreachable 0.0"):
        assert line in metrics
    assert "weft_reconcile_duration_seconds_count" in metrics


def test_subnet_change_fixes_the_bridge_address(make_cluster: MakeCluster) -> None:
    c = make_cluster("host-gw")
    n1, _, _ = c.boot()
    c.pod(n1, "old")
    old_gw = n1.state()["WEFT_SUBNET"]
    c.stop(n1)
    store = c.dir / "store.json"
    data = json.loads(store.read_text())
    data["leases"]["n1"]["Subnet"] = "10.244.77.0/24"
    store.write_text(json.dumps(data))
    c.start(n1)
    c.wait_ready(n1)
    assert n1.state()["WEFT_SUBNET"] == "10.244.77.1/24"
    addrs = n1.ns.run("ip", "-4", "addr", "show", "cni0").stdout
    assert "10.244.77.1/24" in addrs and old_gw not in addrs
    _, ip = c.pod(n1, "new")
    assert ip.startswith("10.244.77.")


def node_config_repairs(cn: ClusterNode) -> dict[str, float]:
    """weft_node_config_repairs_total by file, from weftd's /metrics."""
    code, body = cn.http("/metrics")
    assert code == 200, body
    out = {}
    for line in body.splitlines():
        if line.startswith("weft_node_config_repairs_total{"):
            labels, _, value = line.partition(" ")
            out[labels.split('file="')[1].split('"')[0]] = float(value)
    return out


def test_weftd_puts_back_its_conflist_and_subnet_file(make_cluster: MakeCluster) -> None:
    """The node config is weftd's: overwritten (as `make install` once did with its example), deleted or
    edited, it is written again within a resync (1 s here), with one log line and a count per repair;
    left alone, it is never rewritten."""
    c = make_cluster("host-gw")
    (n1,) = c.boot(["n1"])
    conflist, env = n1.conflist.read_text(), n1.subnet_file.read_text()

    def holds(path: Path, text: str) -> bool:
        try:
            return path.read_text() == text
        except FileNotFoundError:
            return False

    def replace(path: Path, text: str) -> None:
        tmp = path.with_name(".drift.tmp")
        tmp.write_text(text)
        tmp.replace(path)

    edited = json.loads(conflist)
    del edited["plugins"][0][SOCKET_KEY]
    drifts: list[tuple[str, Callable[[], None], Path, str]] = [
        ("the example conflist over it", lambda: replace(n1.conflist, EXAMPLE_CONFLIST.read_text()), n1.conflist,
         conflist),
        ("the conflist deleted", n1.conflist.unlink, n1.conflist, conflist),
        ("the conflist without daemonSocket", lambda: replace(n1.conflist, json.dumps(edited)), n1.conflist,
         conflist),
        ("the subnet file deleted", n1.subnet_file.unlink, n1.subnet_file, env),
        ("the subnet file edited", lambda: replace(n1.subnet_file, env.replace("WEFT_MTU=", "WEFT_MTU=9")),
         n1.subnet_file, env),
    ]
    for what, drift, path, text in drifts:
        drift()
        assert not holds(path, text)
        c.until(lambda path=path, text=text: holds(path, text), 60, f"weftd repairing {what}", n1)
    repairs = node_config_repairs(n1)
    logged = n1.log.read_text().count("repaired drift: ")
    # At least one repair per drift (a repair may see a drift half-made and be followed by a second one).
    assert repairs["10-weft.conflist"] >= 3 and repairs["subnet.env"] >= 2, repairs
    assert logged == sum(repairs.values()), (logged, repairs)
    # Unchanged files are not written again: the same inodes after more rounds.
    inodes = (n1.conflist.stat().st_ino, n1.subnet_file.stat().st_ino)
    rounds = n1.metric("weft_reconcile_duration_seconds_count")
    c.until(lambda: n1.metric("weft_reconcile_duration_seconds_count") >= rounds + 3, 60, "three more rounds", n1)
    assert (n1.conflist.stat().st_ino, n1.subnet_file.stat().st_ino) == inodes
    assert node_config_repairs(n1) == repairs
