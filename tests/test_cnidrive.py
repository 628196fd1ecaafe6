"""ADD, CHECK, DEL and a repeated DEL of a conflist through libcni, as containerd runs it."""

from __future__ import annotations

import json

from tests.lab import ROOT, Node, weft_conf


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
    assert node.leases("weftnet") == {"10.22.0.2": "c1\r\neth0"}
    assert "10.22.0.2" in node.ns.run("nft", "list", "table", "inet", "weft_masq").stdout

    node.drive("check", conflist, "c1", pod.path)
    node.drive("del", conflist, "c1", pod.path)
    node.drive("del", conflist, "c1", pod.path)  # repeated DEL is harmless
    assert "eth0" not in pod.links()
    after = node.snapshot()
    assert node.leases("weftnet") == {}
    # What remains is the shared bridge (with its gateway address) and Weft's empty masquerade chain.
    assert set(after["links"]) - set(before["links"]) == {"cni0"}
    assert "10.22.0.2" not in after["rules"]


def test_pods_reach_each_other_and_the_gateway(node: Node) -> None:
    conflist = node.write_conflist("weftnet", [weft_conf(data_dir=node.data_dir)])
    pods = [node.pod(f"p{i}") for i in range(3)]
    ips = []
    for i, pod in enumerate(pods):
        ips.append(node.drive("add", conflist, f"c{i}", pod.path).json["ips"][0]["address"].split("/")[0])
    assert len(set(ips)) == 3
    for pod in pods:
        pod.run("ping", "-c1", "-W2", "10.22.0.1")
        for ip in ips:
            pod.run("ping", "-c1", "-W2", ip)
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
    assert node.leases("weftnet") == {}
    assert "masquerade" not in node.ns.run("nft", "list", "ruleset").stdout
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
    assert node.leases("weftnet") == {}


def test_shipped_example_conflist(node: Node) -> None:
    example = json.loads((ROOT / "conf" / "10-weft.conflist").read_text())
    example["plugins"][0]["ipam"]["dataDir"] = str(node.data_dir)
    path = node.dir / "example.conflist"
    path.write_text(json.dumps(example))
    pod = node.pod()
    res = node.drive("add", path, "ex", pod.path).json
    assert res["ips"][0]["address"] == "10.244.1.2/24"
    node.drive("del", path, "ex", pod.path)
    assert node.leases("weft") == {}
