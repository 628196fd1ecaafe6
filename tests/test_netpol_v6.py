"""NetworkPolicy over IPv6: a dual-stack cluster of 2 simulated nodes (vxlan in both families, file store,
--policy-dir).

Pods get an IPv4 and an IPv6 address from weftd's two IPAM ranges. Peer sets, ipBlocks and named ports hold
both families; the bridge-family anti-spoofing holds a pod to its own IPv6 address while leaving it
neighbour discovery and duplicate address detection. Tables are derived from the policies' semantics.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.netpol import NetpolModel, policy_cluster
from tests.test_netpol import policy, sel

T80, T81, U80 = (80, "TCP"), (81, "TCP"), (80, "UDP")
V6_NETWORK = "fd00:10::/48"
# x/a, x/b and y/a share n1's bridge; y/b is on n2, across the IPv6 VXLAN.


@pytest.fixture(scope="module")
def dual(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetpolModel]:
    net = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": V6_NETWORK, "Backend": {"Type": "vxlan"}}
    with policy_cluster(tmp_path_factory.mktemp("netpol6"), net, ["n1", "n2"]) as m:
        m.write_namespaces()
        for pid, node in (("x/a", 0), ("x/b", 0), ("y/a", 0), ("y/b", 1)):
            ns, name = pid.split("/")
            m.add_pod(ns, name, m.nodes[node], serve=True)
        assert all(p.ip6.startswith("fd00:10:") for p in m.pods.values())
        m.expect(m.reachability([T80, U80]))
        m.expect(m.reachability([T80, U80]), family=6)
        yield m


@pytest.fixture
def np6(dual: NetpolModel) -> Iterator[NetpolModel]:
    yield dual
    dual.clear_policies()
    dual.expect(dual.reachability([T80, U80]), family=6)


def test_ipv6_peers_and_named_ports_follow_policy_over_tcp_and_udp(np6: NetpolModel) -> None:
    # x/a: ingress only from pod b of its namespace, on port 80 (TCP and UDP); no egress at all.
    np6.apply("in", policy("in", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Ingress", "Egress"], "ingress": [
        {"from": [{"podSelector": sel(pod="b")}], "ports": [{"port": 80}, {"port": 80, "protocol": "UDP"}]}]}))
    # y/a: egress only to namespace x, on the named port serve-81-tcp (resolved on each peer).
    np6.apply("eg", policy("eg", "y", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": sel(ns="x")}], "ports": [{"port": "serve-81-tcp"}]}]}))
    ports = [T80, T81, U80]
    for family in (6, 4):
        want = (np6.reachability(ports).ingress("x/a", False).egress("x/a", False)
                .set("x/b", "x/a", True, [T80, U80]).egress("y/a", False).set("y/a", ["x/b"], True, [T81]))
        if family == 6:
            # Neighbour discovery passes policy: x/b resolves x/a afresh though x/a may send nothing.
            for pod in np6.pods.values():
                pod.netns.run("ip", "-6", "neigh", "flush", "all")
        np6.expect(want, family=family)
    rules = np6.nodes[0].ns.run("nft", "list", "table", "inet", "weft_policy").stdout
    a6, b6 = np6.pods["x/a"].ip6, np6.pods["x/b"].ip6
    assert f"{a6} : jump i_" in rules and f"{b6} . tcp . 81" in rules, rules


def test_ipv6_ip_block_with_except(np6: NetpolModel) -> None:
    ya = np6.pods["y/a"].ip6
    np6.apply("cidr", policy("cidr", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": V6_NETWORK, "except": [f"{ya}/128"]}}]}]}))
    # IPv6: everything in the block but y/a; IPv4: nothing (the block is IPv6 only).
    np6.expect(np6.reachability([T80, U80]).set("x/a", "y/a", False), family=6)
    np6.expect(np6.reachability([T80, U80]).egress("x/a", False))


def _listen(pod_ns: str, port: int, genuine: str) -> subprocess.Popen[str]:
    """Prints the source of every datagram to `port` until three from `genuine` (sent last) are in: not
    until a quiet spell, since under load the sends can be seconds apart."""
    code = ("import socket,sys;s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);"
            f"s.bind(('::',{port}));print('up',flush=True);s.settimeout(60);n=0\n"
            "while n<3: a=s.recvfrom(64)[1][0];print(a,flush=True);n+=a==sys.argv[1]")
    p = subprocess.Popen(["ip", "netns", "exec", pod_ns, sys.executable, "-c", code, genuine], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    return p


SEND = ("import socket,sys;a=lambda h,p:socket.getaddrinfo(h,p,socket.AF_INET6,socket.SOCK_DGRAM)[0][4];"
        "s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);s.bind(a(sys.argv[1],0));"
        "[s.sendto(b'x',a(sys.argv[2],int(sys.argv[3]))) for _ in range(3)]")


def _spoofed(np6: NetpolModel) -> int:
    """weftd's count of spoofed packets, which survives the resync's full replace (the kernel's counter does not)."""
    return int(np6.nodes[0].metric("weft_policy_spoofed_packets_total"))


def test_ipv6_spoofing_is_refused_and_neighbour_discovery_is_not(np6: NetpolModel) -> None:
    xa, xb, ya = np6.pods["x/a"], np6.pods["x/b"], np6.pods["y/a"]
    # Duplicate address detection passes the filter: x/a's probe from :: reaches x/b, whose answer
    # makes x/a give the address up (pods are attached with DAD off, like the bridge plugin's: on for this).
    xa.netns.run("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=1")
    xa.netns.run("ip", "addr", "add", f"{xb.ip6}/128", "dev", "eth0")
    try:
        np6.cluster.until(lambda: "dadfailed" in xa.netns.run("ip", "-6", "addr", "show", "dev", "eth0").stdout,
                          30, "x/a's duplicate address detection of x/b's address to fail")
    finally:
        xa.netns.run("ip", "addr", "del", f"{xb.ip6}/128", "dev", "eth0")
        xa.netns.run("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
    before = _spoofed(np6)
    listener = _listen(ya.netns.name, 9999, xa.ip6)
    try:
        xa.netns.run("ip", "addr", "add", f"{xb.ip6}/128", "dev", "eth0", "nodad")
        try:
            xa.netns.run(sys.executable, "-c", SEND, xb.ip6, ya.ip6, "9999")  # x/b's address from x/a's port
        finally:
            xa.netns.run("ip", "addr", "del", f"{xb.ip6}/128", "dev", "eth0")
        # Link-local is for neighbour discovery only: other traffic from it would pass no policy.
        link_local = next(a["local"] for i in xa.netns.ip_json("-6", "addr", "show", "dev", "eth0")
                          for a in i["addr_info"] if a["local"].startswith("fe80:"))
        ya_ll = next(a["local"] for i in ya.netns.ip_json("-6", "addr", "show", "dev", "eth0")
                     for a in i["addr_info"] if a["local"].startswith("fe80:"))
        xa.netns.run(sys.executable, "-c", SEND, f"{link_local}%eth0", f"{ya_ll}%eth0", "9999")
        xa.netns.run(sys.executable, "-c", SEND, xa.ip6, ya.ip6, "9999")  # genuine
        out, _ = listener.communicate(timeout=90)
    finally:
        listener.kill()
    assert out.split() == [xa.ip6] * 3
    assert _spoofed(np6) - before >= 6  # and more if x/a resolved a neighbour from the stolen address
