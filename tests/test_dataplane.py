"""The dataplane as the kernel runs it: the settings pod-to-pod throughput relies on are on the devices
and tables Weft makes (no timing here; bench/dataplane_bench.py measures the throughput).

Pod traffic stays fast while every device on the way passes the pod's TCP segmentation-offload
super-packets through (a 64 KB skb is one trip through each hop, not 45), which needs the pod MTU
equal along the path and offloads left on; and while nothing of Weft's costs a forwarded packet more
than it must.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.cluster import ClusterNode, MakeCluster
from tests.lab import Netns, host_veths

MB = 1 << 20
SEND = 64 * MB


def counters(ns: Netns, dev: str) -> dict[str, int]:
    stats = ns.ip_json("-s", "link", "show", "dev", dev)[0]["stats64"]
    return {"tx_packets": stats["tx"]["packets"], "tx_bytes": stats["tx"]["bytes"],
            "rx_packets": stats["rx"]["packets"], "rx_bytes": stats["rx"]["bytes"]}


def send_tcp(client: Netns, server: Netns, server_ip: str, size: int) -> None:
    """`size` bytes over one TCP connection, the receiver reading it all."""
    code = ("import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            f"s.bind(('{server_ip}',7001));s.listen();print('up',flush=True);c,_=s.accept();n=0\n"
            "while (b:=c.recv(1<<20)): n+=len(b)\n"
            "print(n)")
    srv = subprocess.Popen(["ip", "netns", "exec", server.name, sys.executable, "-c", code],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "up"
        client.run(sys.executable, "-c",
                   f"import socket;s=socket.create_connection(('{server_ip}',7001),10);b=bytes(1<<20)\n"
                   f"for _ in range({size // MB}): s.sendall(b)\n"
                   "s.close()")
        assert int(srv.stdout.readline()) == size
    finally:
        srv.kill()
        srv.wait()


def mtu(ns: Netns, dev: str) -> int:
    return int(ns.ip_json("link", "show", "dev", dev)[0]["mtu"])


def path_devices(backend: str, n1: ClusterNode, n2: ClusterNode, a: Netns, b: Netns) -> list[tuple[Netns, str, str]]:
    """Weft's devices a pod-to-pod stream from `a` (on n1) to `b` (on n2) crosses, each with the
    direction its data goes through it: (namespace, device, "tx" or "rx")."""
    (h1,), (h2,) = host_veths(n1.node), host_veths(n2.node)
    devices = [(a, "eth0", "tx"), (n1.ns, h1, "rx"), (n1.ns, "cni0", "rx")]
    if backend == "vxlan":
        devices += [(n1.ns, "weft.1", "tx"), (n2.ns, "weft.1", "rx")]
    return [*devices, (n2.ns, "cni0", "tx"), (n2.ns, h2, "tx"), (b, "eth0", "rx")]


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_pod_stream_crosses_weft_devices_as_offload_super_packets(make_cluster: MakeCluster, backend: str) -> None:
    c = make_cluster(backend)
    n1, n2 = c.boot(["n1", "n2"])
    a, _ = c.pod(n1, "a")
    b, b_ip = c.pod(n2, "b")
    underlay = mtu(n1.ns, "eth0")
    want = underlay - 50 if backend == "vxlan" else underlay
    devices = path_devices(backend, n1, n2, a, b)
    # One MTU along the path, the underlay's less the encapsulation: no hop fragments or refuses a
    # full-size frame, and TCP's segment size is the same on every device.
    assert {f"{ns.name}/{dev}": mtu(ns, dev) for ns, dev, _ in devices} == \
        {f"{ns.name}/{dev}": want for ns, dev, _ in devices}
    before = {(ns.name, dev): counters(ns, dev) for ns, dev, _ in devices}
    send_tcp(a, b, b_ip, SEND)
    sizes: dict[str, Any] = {}
    for ns, dev, way in devices:
        now, then = counters(ns, dev), before[(ns.name, dev)]
        packets = now[f"{way}_packets"] - then[f"{way}_packets"]
        octets = now[f"{way}_bytes"] - then[f"{way}_bytes"]
        assert octets >= SEND, (ns.name, dev, way, octets)
        sizes[f"{ns.name}/{dev} {way}"] = octets // packets
    # A device counts what it passes: an average of 1.5 MTUs or more is only possible if the stream went
    # through as segmentation-offload super-packets (without them every packet is at most one MTU).
    assert all(size > 1.5 * want for size in sizes.values()), json.dumps(sizes, indent=1)


def test_nat_table_has_no_forward_chain_and_an_older_one_goes(make_cluster: MakeCluster) -> None:
    """An nftables accept cannot override another chain's drop, so a forward chain of accepts in Weft's
    table only costs every forwarded packet; the one an older Weft made is removed when weftd starts."""
    c = make_cluster("host-gw")
    n1 = c.add_node("n1")
    n1.ns.run("nft", "-f", "-", input=(
        "add table inet weft\nadd set inet weft fwd_nets4 { type ipv4_addr; flags interval; }\n"
        "add chain inet weft forward { type filter hook forward priority filter; policy accept; }\n"
        "add rule inet weft forward ip saddr @fwd_nets4 accept\n"))
    c.start(n1)
    c.wait_ready(n1)
    c.until(lambda: "chain forward" not in n1.ns.run("nft", "list", "table", "inet", "weft").stdout, 60,
            "the old forward chain removed", n1)
    table = n1.ns.run("nft", "-j", "list", "table", "inet", "weft").stdout
    chains = [i["chain"] for i in json.loads(table)["nftables"] if "chain" in i]
    assert [(ch["name"], ch.get("hook")) for ch in chains] == [("postrouting", "postrouting")]
    assert any(s == "fwd_nets4" and o == "weftd" for s, _, o in n1.node.nat_elements())  # weftd's record stays


# Tables of Weft's earlier layout, as an older weftd (`ip weft`) and plugin (`inet weft_masq`) made them.
OLD_WEFT = ("table ip weft {\n chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n"
            "  meta mark & 0x4000 == 0x4000 return\n  ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return\n"
            "  ip saddr 10.244.0.0/16 ip daddr 224.0.0.0/4 return\n  ip saddr 10.244.0.0/16 masquerade fully-random\n"
            " }\n chain forward {\n  type filter hook forward priority filter; policy accept;\n"
            "  ip saddr 10.244.0.0/16 accept\n  ip daddr 10.244.0.0/16 accept\n }\n}\n")
OLD_MASQ = ("table inet weft_masq {\n chain postrouting {\n"
            "  type nat hook postrouting priority srcnat; policy accept;\n"
            "  ip saddr 10.244.7.2 ip daddr != 10.244.7.0/24 ip daddr != 224.0.0.0/4 masquerade"
            ' comment "weft:0123456789abcdef:fedcba9876543210"\n }\n}\n')


def test_tables_of_the_earlier_layout_go_when_weftd_starts(make_cluster: MakeCluster) -> None:
    """weftd deletes the tables `ip weft` and `inet weft_masq` an older Weft made; tables by those names
    holding anything Weft did not put there are left alone."""
    c = make_cluster("host-gw")
    n1, n2 = c.add_node("n1"), c.add_node("n2")
    n1.ns.run("nft", "-f", "-", input=OLD_WEFT + OLD_MASQ)
    n2.ns.run("nft", "-f", "-", input=OLD_WEFT + OLD_MASQ + "add set ip weft theirs { type ipv4_addr; }\n"
              "add rule inet weft_masq postrouting ip saddr 10.9.9.9 masquerade\n")
    for cn in (n1, n2):
        c.start(cn)
    for cn in (n1, n2):
        c.wait_ready(cn)  # the tables are handled before weftd's own rules, well before it is ready

    def tables(cn: ClusterNode) -> set[str]:
        return {line.strip() for line in cn.ns.run("nft", "list", "tables").stdout.splitlines()}

    assert "table ip weft" not in tables(n1) and "table inet weft_masq" not in tables(n1)
    assert "table inet weft" in tables(n1)
    assert {"table ip weft", "table inet weft_masq", "table inet weft"} <= tables(n2)
    assert "10.9.9.9" in n2.ns.run("nft", "list", "table", "inet", "weft_masq").stdout
    log = n2.log.read_text()
    assert "leaving nftables table ip weft alone" in log and "leaving nftables table inet weft_masq alone" in log
