"""ADD, CHECK, DEL and a repeated DEL of a conflist through libcni, as containerd runs it."""

from __future__ import annotations

import json

from tests.lab import ROOT, Node, ping, weft_conf


def test_lifecycle_through_libcni(node: Node) -> None:
    before = node.snapshot()
    conflist = node.write_conflist("weftnet", [weft_conf(data_dir=node.data_dir, ipMasq=True, hairpinMode=True)])
    pod = node.pod()
    res = node.drive("add", conflist, "c1", pod.path).json
    assert [i["name"] for i in res["interfaces"]][::2] == ["cni0", "eth0"]
    assert res["interfaces"][2]["sandbox"] == pod.path
    assert res["ips"] == [{"interface": 2, "address": "10.22.0.2/24", "gateway": "10.22.0.1"}]
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.22.0.1"}]
    eth0 = pod.links()["eth0"]
    assert eth0["address"] == res["interfaces"][2]["mac"] and eth0["operstate"] == "UP"
    host = node.ns.links()[res["interfaces"][1]["name"]]
    assert host["master"] == "cni0"
    assert "10.22.0.2/24" in pod.run("ip", "-4", "addr", "show", "eth0").stdout
    assert "default via 10.22.0.1" in pod.run("ip", "route").stdout
    assert node.reservations("weftnet") == {"10.22.0.2": "c1\r\neth0"}
    assert node.masqueraded() == ["10.22.0.2"]

    node.drive("check", conflist, "c1", pod.path)
    node.drive("del", conflist, "c1", pod.path)
    node.drive("del", conflist, "c1", pod.path)  # repeated DEL is harmless
    assert "eth0" not in pod.links()
    after = node.snapshot()
    assert node.reservations("weftnet") == {}
    # What remains is the shared bridge (with its gateway address) and Weft's NAT table, without the pod.
    assert set(after["links"]) - set(before["links"]) == {"cni0"}
    assert "10.22.0.2" not in after["rules"] and node.masqueraded() == []


def test_the_kernel_holds_what_add_asked_for(node: Node) -> None:
    """Every attribute ADD sets in its netlink requests, read back with iproute2."""
    conf = weft_conf(data_dir=node.data_dir, mtu=1400, hairpinMode=True, promiscMode=False,
                     ipam={"routes": [{"dst": "10.40.0.0/16"}, {"dst": "10.41.0.0/16", "gw": "10.22.0.9"}]})
    conflist = node.write_conflist("kern", [conf])
    pod = node.pod()
    res = node.drive("add", conflist, "k1", pod.path).json
    host_name = res["interfaces"][1]["name"]
    links = {link["ifname"]: link for link in node.ns.ip_json("-d", "link", "show")}
    bridge, host = links["cni0"], links[host_name]
    assert bridge["linkinfo"]["info_kind"] == "bridge" and bridge["linkinfo"]["info_data"]["forward_delay"] == 0
    assert bridge["group"] == host["group"] == str(0x77656674) and bridge["mtu"] == 1400 and "UP" in bridge["flags"]
    assert host["linkinfo"]["info_kind"] == "veth" and host["master"] == "cni0" and "UP" in host["flags"]
    assert host["mtu"] == 1400 and host["address"] == res["interfaces"][1]["mac"]
    assert host["ifalias"] == "weft kern k1 eth0"
    assert host["linkinfo"]["info_slave_data"]["hairpin"] is True
    eth0 = pod.ip_json("-d", "link", "show", "eth0")[0]
    assert eth0["mtu"] == 1400 and eth0["group"] == str(0x77656674) and "UP" in eth0["flags"]
    assert eth0["link_index"] == host["ifindex"]
    assert [(a["local"], a["prefixlen"]) for a in pod.ip_json("-4", "addr", "show", "eth0")[0]["addr_info"]] == \
        [("10.22.0.2", 24)]
    routes = {r["dst"]: r for r in pod.ip_json("-4", "route", "show")}
    assert routes["default"]["gateway"] == "10.22.0.1" and routes["default"]["protocol"] == "static"
    assert routes["10.40.0.0/16"]["gateway"] == "10.22.0.1"  # no gw: the network's gateway
    assert routes["10.41.0.0/16"]["gateway"] == "10.22.0.9"
    assert [(a["local"], a["prefixlen"]) for a in node.ns.ip_json("-4", "addr", "show", "cni0")[0]["addr_info"]] == \
        [("10.22.0.1", 24)]
    node.drive("check", conflist, "k1", pod.path)
    node.drive("del", conflist, "k1", pod.path)
    assert host_name not in node.ns.links() and "eth0" not in pod.links()


def test_pods_reach_each_other_and_the_gateway(node: Node) -> None:
    conflist = node.write_conflist("weftnet", [weft_conf(data_dir=node.data_dir)])
    pods = [node.pod(f"p{i}") for i in range(3)]
    ips = []
    for i, pod in enumerate(pods):
        ips.append(node.drive("add", conflist, f"c{i}", pod.path).json["ips"][0]["address"].split("/")[0])
    assert len(set(ips)) == 3
    for pod in pods:
        assert ping(pod, "10.22.0.1")
        for ip in ips:
            assert ping(pod, ip)
    for i, pod in enumerate(pods):
        node.drive("del", conflist, f"c{i}", pod.path)
    assert not any(n.startswith("weft") for n in node.ns.links())


def test_del_after_netns_is_gone(node: Node) -> None:
    conflist = node.write_conflist("weftnet", [weft_conf(data_dir=node.data_dir, ipMasq=True)])
    pod = node.pod()
    node.drive("add", conflist, "gone", pod.path)
    node.lab.namespaces.remove(pod)
    node.ns.run("ip", "netns", "del", pod.name)
    # containerd sends an empty CNI_NETNS once the sandbox's netns is closed.
    node.drive("del", conflist, "gone", "")
    assert node.reservations("weftnet") == {}
    assert node.masqueraded() == []
    assert not any(n.startswith("weft") for n in node.ns.links())


def test_bare_conf_file(node: Node) -> None:
    """A legacy single-plugin .conf, which libcni and containerd up-convert to a list."""
    path = node.dir / "10-weft.conf"
    path.write_text(json.dumps(weft_conf(version="0.4.0", data_dir=node.data_dir)))
    pod = node.pod()
    res = node.drive("add", path, "conf1", pod.path).json
    assert res["cniVersion"] == "0.4.0" and res["ips"][0]["version"] == "4"
    node.drive("check", path, "conf1", pod.path)
    node.drive("del", path, "conf1", pod.path)
    assert node.reservations("weftnet") == {}


def test_shipped_example_conflist(node: Node) -> None:
    example = json.loads((ROOT / "conf" / "10-weft.conflist").read_text())
    example["plugins"][0]["ipam"]["dataDir"] = str(node.data_dir)
    path = node.dir / "example.conflist"
    path.write_text(json.dumps(example))
    pod = node.pod()
    res = node.drive("add", path, "ex", pod.path).json
    assert res["ips"][0]["address"] == "10.244.1.2/24"
    node.drive("del", path, "ex", pod.path)
    assert node.reservations("weft") == {}
