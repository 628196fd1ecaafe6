"""Dual-stack pods: one IPv4 and one IPv6 range set, both programmed and reachable."""

from __future__ import annotations

from tests.lab import Node, ping, weft_conf


def test_dual_stack_pods_talk_over_both_families(node: Node) -> None:
    conf = weft_conf(data_dir=node.data_dir, isDefaultGateway=False, ipam={
        "subnet": None,
        "ranges": [[{"subnet": "10.40.0.0/24"}], [{"subnet": "fd00:40::/64"}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
    })
    conf["ipam"].pop("subnet")
    conflist = node.write_conflist("weftnet", [conf])
    pods = [node.pod(f"p{i}") for i in range(2)]
    results = [node.drive("add", conflist, f"d{i}", p.path).json for i, p in enumerate(pods)]
    addrs = [[ip["address"] for ip in r["ips"]] for r in results]
    assert addrs == [["10.40.0.2/24", "fd00:40::2/64"], ["10.40.0.3/24", "fd00:40::3/64"]]
    assert {r["dst"]: r.get("gw") for r in results[0]["routes"]} == {"0.0.0.0/0": None, "::/0": None}
    assert "default via fd00:40::1" in pods[0].run("ip", "-6", "route").stdout
    # The bridge's IPv6 gateway is usable at once: added without duplicate address detection.
    gw = node.ns.run("ip", "-6", "addr", "show", "dev", "cni0", "scope", "global").stdout
    assert "fd00:40::1/64" in gw and "tentative" not in gw and "nodad" in gw
    assert ping(pods[0], "10.40.0.3")
    assert ping(pods[0], "fd00:40::3", "-6")
    for i, p in enumerate(pods):
        node.drive("check", conflist, f"d{i}", p.path)
        node.drive("del", conflist, f"d{i}", p.path)
    assert node.reservations("weftnet") == {}
