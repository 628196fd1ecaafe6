"""ipMasq on the wire: a pod's traffic leaving its subnet is masqueraded, traffic inside it is not."""

from __future__ import annotations

from tests.lab import Lab, Node, peer_address, weft_conf


def test_ipmasq_masquerades_leaving_traffic_only(lab: Lab, node: Node) -> None:
    outside = lab.netns("outside")
    node.ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", outside.name)
    node.ns.run("ip", "addr", "add", "192.168.95.1/24", "dev", "eth0")
    node.ns.run("ip", "link", "set", "eth0", "up")
    outside.run("ip", "addr", "add", "192.168.95.2/24", "dev", "eth0")
    outside.run("ip", "link", "set", "eth0", "up")
    outside.run("ip", "link", "set", "lo", "up")
    conf = weft_conf(data_dir=node.data_dir, ipMasq=True)
    a, b = node.pod("a"), node.pod("b")
    a_ip = node.plugin("ADD", conf, cid="a", netns=a.path).json["ips"][0]["address"].split("/")[0]
    b_ip = node.plugin("ADD", conf, cid="b", netns=b.path).json["ips"][0]["address"].split("/")[0]
    # The outside has no route to 10.22.0.0/24: only a masqueraded connection can be answered.
    assert peer_address(outside, "192.168.95.2", a) == "192.168.95.1"
    assert peer_address(b, b_ip, a) == a_ip
    assert node.plugin("DEL", conf, cid="a", netns="").rc == 0
    assert node.masqueraded() == [b_ip]
