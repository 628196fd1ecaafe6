"""Where a TCP stream's CPU goes, node-to-node against pod-to-pod: the table in docs/performance.md
("Where pod traffic's CPU goes").

`python -m bench.dataplane_profile [vxlan|host-gw]` (root, needs `perf`: Debian's linux-perf). It boots
the dataplane bench's two nodes, runs one iperf3 stream node-to-node and one pod-to-pod under
`perf record -a -g`, and sorts the samples of the iperf3 processes (which do the kernel's softirq work
of every hop) by the innermost stage on their stack, in ms of CPU per GB moved. Not part of `make
bench`: perf is not one of Weft's dependencies.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.dataplane_bench import NICE, iperf_server, pod_pair
from tests.lab import Netns

HZ = 2000
STAGES: dict[str, set[str]] = {
    "copies to and from user space": {"_copy_from_iter", "_copy_to_iter", "skb_copy_datagram_iter",
                                      "__skb_datagram_iter"},
    "conntrack, NAT, nftables and br_netfilter hooks": {
        "nf_hook_slow", "nf_hook_slow_list", "br_nf_hook_thresh", "nf_conntrack_in", "nf_confirm",
        "__nf_conntrack_confirm", "nf_ct_get_tuple", "nft_do_chain", "nft_do_chain_inet", "nft_do_chain_ipv4",
        "nf_nat_inet_fn", "nf_nat_ipv4_pre_routing", "nf_nat_ipv4_out", "nf_nat_ipv4_local_fn",
        "nf_nat_ipv4_local_in"},
    "forwarding and route lookups": {"ip_route_input_noref", "ip_route_input_slow", "ip_route_output_key_hash",
                                     "ip_route_output_flow", "fib_table_lookup", "ip_route_input_rcu", "ip_forward",
                                     "ip_forward_finish"},
    "vxlan encapsulation and decapsulation": {"vxlan_xmit", "vxlan_xmit_one", "iptunnel_xmit",
                                              "udp_tunnel_xmit_skb", "vxlan_rcv", "udp_queue_rcv_skb", "udp_rcv",
                                              "__udp4_lib_rcv", "gro_cells_receive", "gro_cell_poll"},
    "bridges": {"br_handle_frame", "br_handle_frame_finish", "br_dev_xmit", "br_forward", "br_pass_frame_up",
                "br_netif_receive_skb", "__br_forward", "br_dev_queue_push_xmit"},
    "veth hops": {"veth_xmit", "__dev_forward_skb", "veth_forward_skb", "veth_poll"},
    "device transmit and receive cores": {
        "__netif_receive_skb_core.constprop.0", "__netif_receive_skb", "process_backlog",
        "netif_receive_skb_list_internal", "__netif_receive_skb_list_core", "ip_rcv", "ip_list_rcv", "ip_rcv_finish",
        "ip_sublist_rcv", "ip_local_deliver", "ip_local_deliver_finish", "net_rx_action", "napi_complete_done",
        "__napi_poll", "__dev_queue_xmit", "dev_hard_start_xmit", "ip_finish_output2", "ip_output", "__ip_queue_xmit",
        "ip_local_out", "validate_xmit_skb", "neigh_hh_output"},
    "TCP": {"tcp_v4_rcv", "tcp_sendmsg_locked", "tcp_recvmsg_locked", "tcp_write_xmit", "__tcp_transmit_skb",
            "tcp_ack", "tcp_rcv_established", "tcp_v4_do_rcv"},
}
STAGE_OF = {fn: stage for stage, fns in STAGES.items() for fn in fns}


def profile(client: Netns, server: Netns, server_ip: str, data: Path, seconds: int = 5) -> dict[str, float]:
    """ms of CPU per GB by stage for one iperf3 stream."""
    with iperf_server(server, server_ip):
        for _ in range(100):  # until it listens
            if server.run("ss", "-Hltn", "sport", "=", ":5201").stdout.strip():
                break
            time.sleep(0.1)
        p = subprocess.run(["perf", "record", "-q", "-o", str(data), "-a", "-g", "-F", str(HZ), "--", "ip", "netns",
                            "exec", client.name, *NICE, "iperf3", "-c", server_ip, "-t", str(seconds), "-J"],
                           capture_output=True, text=True, check=True)
        gb = json.loads(p.stdout)["end"]["sum_received"]["bytes"] / 1e9
    script = subprocess.run(["perf", "script", "-i", str(data), "--comm", "iperf3,ksoftirqd/0,ksoftirqd/1", "-F",
                             "comm,ip,sym"], capture_output=True, text=True, check=True).stdout
    count: collections.Counter[str] = collections.Counter()
    for block in script.split("\n\n"):
        frames = [line.split() for line in block.strip().splitlines()[1:]]
        if not block.strip():
            continue
        stage = next((STAGE_OF[f[1]] for f in frames if len(f) >= 2 and f[1] in STAGE_OF), "everything else")
        count[stage] += 1
    return {stage: n * 1000 / HZ / gb for stage, n in count.items()}


def main(backends: list[str]) -> int:
    for backend in backends or ["vxlan", "host-gw"]:
        with pod_pair(backend) as (n1, n2, a, b, b_ip):
            node = profile(n1.ns, n2.ns, n2.ip, n1.node.dir / "node.data")
            pod = profile(a, b, b_ip, n1.node.dir / "pod.data")
        print(f"{backend}: ms of CPU per GB   node-to-node  pod-to-pod")
        for stage in [*STAGES, "everything else"]:
            print(f"  {stage:48} {node.get(stage, 0):8.0f}  {pod.get(stage, 0):8.0f}")
        total_node, total_pod = sum(node.values()), sum(pod.values())
        print(f"  {'total':48} {total_node:8.0f}  {total_pod:8.0f}   node/pod {total_node / total_pod:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
