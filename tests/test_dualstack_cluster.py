"""weftd with dual stack and IPv6-only on 3 simulated nodes: vxlan and host-gw, pods across nodes over
both families (ICMP and TCP), the largest packet that fits, IPv6 masquerade, direct routing over IPv6."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.cluster import ETCD_IP, OUTSIDE_IP, OUTSIDE_IP6, Cluster, ClusterNode, MakeCluster
from tests.lab import assert_path_mtu, peer_address, ping

V6NET = "fd00:10:244::/56"
MODES = {"dual": {"EnableIPv6": True, "IPv6Network": V6NET},
         "v6only": {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": V6NET}}
# Per-family headers a ping adds to its payload: IP + ICMP.
ICMP_HEADERS = {4: 20 + 8, 6: 40 + 8}
# The largest DF ping payloads, measured on a 1500-byte underlay, per backend and family.
LARGEST = {"vxlan": {4: 1402, 6: 1382}, "host-gw": {4: 1472, 6: 1452}}


def family(ip: str) -> int:
    return 6 if ":" in ip else 4


def subnet6(cn: ClusterNode) -> str:
    return cn.state()["WEFT_IPV6_SUBNET"].replace("::1/", "::/")


def boot_with_pods(make_cluster: MakeCluster, backend: str, mode: str, **opts: Any) -> Cluster:
    c = make_cluster(backend, net=MODES[mode], **opts)
    nodes = c.boot()
    for cn in nodes:
        c.pod(cn, f"pod-{cn.name}")
    return c


@pytest.mark.parametrize("mode", ["dual", "v6only"])
@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_pods_talk_across_nodes_over_both_families(make_cluster: MakeCluster, backend: str, mode: str) -> None:
    c = boot_with_pods(make_cluster, backend, mode)
    n1, n2, n3 = c.nodes.values()
    versions = (4, 6) if mode == "dual" else (6,)

    # The node's state file: Flannel's subnet.env keys, a family's only when it is on.
    state = n1.state()
    assert state["WEFT_IPV6_NETWORK"] == V6NET and state["WEFT_IPV6_SUBNET"].endswith("::1/64")
    assert ("WEFT_NETWORK" in state) == (mode == "dual") and ("WEFT_SUBNET" in state) == (mode == "dual")
    # The conflist: one IPAM range set per family (one family: its subnet), routes to every network.
    ipam = json.loads(n1.conflist.read_text())["plugins"][0]["ipam"]
    subnets = [rs[0]["subnet"] for rs in ipam["ranges"]] if "ranges" in ipam else [ipam["subnet"]]
    assert subnets == ([state["WEFT_SUBNET"].replace(".1/", ".0/")] if mode == "dual" else []) + [subnet6(n1)]
    assert [r["dst"] for r in ipam["routes"]] == (["10.244.0.0/16"] if mode == "dual" else []) + [V6NET]
    assert n1.ns.run("sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"

    # Routes to every peer in every family; none for a family that is off.
    r6 = {r["dst"]: r for r in n1.routes(6)}
    assert set(r6) == {subnet6(n2), subnet6(n3)}
    assert (len(n1.routes(4)) == 2) == (mode == "dual")
    if backend == "vxlan":
        vtep = n1.ns.ip_json("-d", "link", "show", "weft6.1")[0]
        data = vtep["linkinfo"]["info_data"]
        assert (data["id"], data["local6"], data["learning"], vtep["mtu"]) == (1, n1.ip6, False, 1430)
        assert ("weft.1" in n1.ns.links()) == (mode == "dual")
        for peer in (n2, n3):
            r = r6[subnet6(peer)]
            assert r["dev"] == "weft6.1" and r["gateway"] == subnet6(peer).split("/")[0] and "onlink" in r["flags"]
        neigh = n1.ns.ip_json("-6", "neigh", "show", "dev", "weft6.1")
        assert {n["dst"] for n in neigh} == {subnet6(p).split("/")[0] for p in (n2, n3)}
        assert all("PERMANENT" in n["state"] for n in neigh)
        fdb = n1.ns.run("bridge", "fdb", "show", "dev", "weft6.1").stdout
        assert fdb.count("permanent") == 2 and f"dst {n2.ip6} " in fdb and f"dst {n3.ip6} " in fdb
        addr = n1.ns.run("ip", "-6", "addr", "show", "dev", "weft6.1", "scope", "global").stdout
        assert f"{subnet6(n1).split('/')[0]}/128" in addr and "tentative" not in addr
    else:
        assert {r["gateway"] for r in r6.values()} == {n2.ip6, n3.ip6}
        assert all(r["dev"] == "eth0" for r in r6.values())
        assert not any(name.startswith("weft6.") for name in n1.ns.links())

    # Every pod reaches every other, in every family, ICMP and TCP, unmasqueraded.
    pods = [(cn.pods[cid][0], cn.pod_ips[cid]) for cn in c.nodes.values() for cid in cn.pods]
    assert all(sorted(map(family, ips)) == list(versions) for _, ips in pods)
    for ns, own in pods:
        for other_ns, ips in pods:
            if other_ns is ns:
                continue
            for ip in ips:
                assert ping(ns, ip), f"{ns.name} cannot reach {ip}"
                assert peer_address(other_ns, ip, ns) == own[list(versions).index(family(ip))]


@pytest.mark.parametrize("mode", ["dual", "v6only"])
@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_largest_packet_fits_and_one_more_byte_does_not(make_cluster: MakeCluster, backend: str,
                                                        mode: str) -> None:
    c = boot_with_pods(make_cluster, backend, mode)
    n1, n2, _ = c.nodes.values()
    mtu = int(n1.state()["WEFT_MTU"])
    # vxlan: the IPv6 device's 70 bytes bound the pod MTU (one pod interface carries both families).
    assert mtu == {"vxlan": 1430, "host-gw": 1500}[backend]
    a, _ = n1.pods["pod-n1"]
    assert a.links()["eth0"]["mtu"] == mtu
    for ip in n2.pod_ips["pod-n2"]:
        assert mtu - ICMP_HEADERS[family(ip)] == LARGEST[backend][family(ip)]
        assert_path_mtu(a, ip, mtu)


@pytest.mark.parametrize("mode", ["dual", "v6only"])
def test_ipv6_masquerade_to_outside(make_cluster: MakeCluster, mode: str) -> None:
    c = boot_with_pods(make_cluster, "vxlan", mode)
    n1 = c.nodes["n1"]
    a, _ = n1.pods["pod-n1"]
    # The outside namespace knows no pod network: only the node's own address can be answered.
    assert peer_address(c.outside, OUTSIDE_IP6, a) == n1.ip6
    assert ping(a, OUTSIDE_IP6)
    if mode == "dual":
        assert peer_address(c.outside, OUTSIDE_IP, a) == n1.ip
    # The network is in the shared NAT table's IPv6 sets; multicast (ff00::/8) is never masqueraded.
    prefix = json.dumps({"prefix": {"addr": V6NET.split("/")[0], "len": 56}})
    elements = {(s, v) for s, v, owner in n1.node.nat_elements() if owner == "weftd"}
    assert {("masq_nets6", prefix), ("fwd_nets6", prefix)} <= elements
    assert "ip6 daddr ff00::/8 return" in n1.ns.run("nft", "list", "chain", "inet", "weft", "postrouting").stdout


def test_ipv6_direct_routing_uses_host_gw_on_link_and_vxlan_beyond(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan", two_segments=True, net=MODES["dual"], DirectRouting=True)
    n1, n2, n3 = c.boot(segments={"n3": "B"})
    r6 = {r["dst"]: (r.get("gateway"), r["dev"]) for r in n1.routes(6)}
    assert r6[subnet6(n2)] == (n2.ip6, "eth0")
    assert r6[subnet6(n3)] == (subnet6(n3).split("/")[0], "weft6.1")
    assert len(n1.ns.ip_json("-6", "neigh", "show", "dev", "weft6.1")) == 1
    for cn in (n1, n2, n3):
        c.pod(cn, f"pod-{cn.name}")
    a, _ = n1.pods["pod-n1"]
    for cn in (n2, n3):
        for ip in cn.pod_ips[f"pod-{cn.name}"]:
            assert ping(a, ip), f"n1 cannot reach {ip}"


def test_ipv6_masquerade_on_a_legacy_iptables_node(make_cluster: MakeCluster) -> None:
    c = make_cluster("host-gw", net=MODES["dual"])
    n1, n2 = c.add_node("n1"), c.add_node("n2")
    n1.ns.run("iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")  # kubelet's legacy-mode hint
    for cn in (n1, n2):
        c.start(cn)
    for cn in (n1, n2):
        c.wait_ready(cn)
    saved = n1.ns.run("ip6tables-legacy-save", "-t", "nat").stdout
    assert f"-A WEFT-POSTRTG -s {V6NET} -d ff00::/8" in saved and "-j WEFT-POSTRTG" in saved
    assert f"-A WEFT-FWD -s {V6NET}" in n1.ns.run("ip6tables-legacy-save", "-t", "filter").stdout
    a, _ = c.pod(n1, "a")
    assert peer_address(c.outside, OUTSIDE_IP6, a) == n1.ip6
    assert peer_address(c.outside, OUTSIDE_IP, a) == n1.ip
    # Applied as wanted: ensuring them again changes nothing, in either family.
    code = ("import netaddr;from weftd.netfilter import LegacyRules;"
            f"print(LegacyRules([netaddr.IPNetwork('10.244.0.0/16'), netaddr.IPNetwork('{V6NET}')], True).ensure())")
    assert n1.ns.run(sys.executable, "-c", code).stdout.strip() == "False"


def test_etcd_store_leases_carry_both_families(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan", store="etcd", net=MODES["dual"])
    c.start_etcd()
    n1, n2, n3 = c.boot()
    code = ("from etcd3gw.client import Etcd3Client;import json\n"
            f"c=Etcd3Client(host='{ETCD_IP}',port=2379)\n"
            "print(json.dumps({m['key'].decode():json.loads(v) for v,m in c.get_prefix('/weft/network/subnets/')}))")
    assert c.etcd_ns is not None
    keys = json.loads(c.etcd_ns.run(sys.executable, "-c", code).stdout)
    for cn in (n1, n2, n3):
        v4 = cn.state()["WEFT_SUBNET"].replace(".1/", ".0/")
        lease = keys[f"/weft/network/subnets/{v4.replace('/', '-')}&{subnet6(cn).replace('/', '-')}"]
        assert lease["PublicIPv6"] == cn.ip6 and lease["BackendV6Data"]["VtepMAC"] == \
            cn.ns.links()["weft6.1"]["address"]
    c.pod(n1, "a")
    _, _ = c.pod(n3, "b")
    a, _ = n1.pods["a"]
    for ip in n3.pod_ips["b"]:
        assert ping(a, ip)


def test_uninstall_removes_the_ipv6_state_too(make_cluster: MakeCluster) -> None:
    c = make_cluster("vxlan", net=MODES["dual"])
    n1, _ = c.boot(["n1", "n2"])
    assert n1.routes(6) and "weft6.1" in n1.ns.links()
    c.stop(n1)
    c.uninstall(n1)
    assert n1.routes(6) == [] and n1.routes(4) == []
    assert not any(name.startswith("weft") for name in n1.ns.links())
    assert n1.node.nat_elements() == []
    assert not n1.subnet_file.exists() and not n1.conflist.exists()
