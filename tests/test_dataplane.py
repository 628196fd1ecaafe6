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
