"""CHECK catches drift; STATUS reports readiness; GC frees what no valid attachment owns."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.lab import Netns, Node, weft_conf
from weftlib.kernel.netlink import host_veth_name


def _added(node: Node, pod: Netns, cid: str = "c1", **opts: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    conf = weft_conf(data_dir=node.data_dir, **opts)
    out = node.plugin("ADD", conf, cid=cid, netns=pod.path)
    assert out.rc == 0, out.stdout
    return conf, out.json


DRIFTS = {
    "address removed": (("ip", "addr", "flush", "dev", "eth0"), "address 10.22.0.2/24 is missing"),
    "route removed": (("ip", "route", "del", "default"), "route 0.0.0.0/0 via 10.22.0.1 is missing"),
    "interface renamed": (("sh", "-c", "ip link set eth0 down && ip link set eth0 name eth9"), "eth0 is missing"),
    "mac changed": (("ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"), "has MAC"),
}


@pytest.mark.parametrize("drift", DRIFTS)
def test_check_reports_drift(node: Node, drift: str) -> None:
    pod = node.pod()
    conf, res = _added(node, pod)
    assert node.plugin("CHECK", {**conf, "prevResult": res}, cid="c1", netns=pod.path).rc == 0
    cmd, words = DRIFTS[drift]
    pod.run(*cmd)
    out = node.plugin("CHECK", {**conf, "prevResult": res}, cid="c1", netns=pod.path)
    assert out.rc == 1 and words in out.json["details"], out.stdout


@pytest.mark.parametrize("drift", ["detached", "bridge gone"])
def test_check_reports_host_side_drift(node: Node, drift: str) -> None:
    pod = node.pod()
    conf, res = _added(node, pod)
    host = next(i["name"] for i in res["interfaces"] if i["name"].startswith("weft") and "sandbox" not in i)
    if drift == "detached":
        node.ns.run("ip", "link", "set", host, "nomaster")
        words = f"host veth {host} is not attached to cni0"
    else:
        node.ns.run("ip", "link", "del", "cni0")
        words = "bridge cni0 is missing or not a bridge"
    out = node.plugin("CHECK", {**conf, "prevResult": res}, cid="c1", netns=pod.path)
    assert out.rc == 1 and words in out.json["details"], out.stdout


def test_check_reports_missing_lease_and_rules(node: Node) -> None:
    pod = node.pod()
    conf, res = _added(node, pod, ipMasq=True)
    assert node.masqueraded() == ["10.22.0.2"]
    node.ns.run("nft", "delete", "element", "inet", "weft", "masq_pods4", "{ 10.22.0.2 }")
    out = node.plugin("CHECK", {**conf, "prevResult": res}, cid="c1", netns=pod.path)
    assert out.rc == 1 and "masquerade" in out.json["details"]
    (node.data_dir / "weftnet" / "10.22.0.2").unlink()
    out = node.plugin("CHECK", {**conf, "prevResult": res}, cid="c1", netns=pod.path)
    assert out.rc == 1 and "failed to find address" in out.json["details"]


def test_masq_chain_is_declared_again_when_removed(node: Node) -> None:
    """ADD adds its set elements to the existing table, and declares table and chain only when they are gone."""
    conf, _ = _added(node, node.pod(), ipMasq=True)
    node.ns.run("nft", "delete", "table", "inet", "weft")
    _added(node, node.pod(), cid="c2", ipMasq=True)
    node.ns.run("nft", "delete", "chain", "inet", "weft", "postrouting")
    _added(node, node.pod(), cid="c3", ipMasq=True)
    chain = json.loads(node.ns.run("nft", "-j", "list", "chain", "inet", "weft", "postrouting").stdout)
    base = next(i["chain"] for i in chain["nftables"] if "chain" in i)
    assert (base["type"], base["hook"]) == ("nat", "postrouting")
    rules = [i["rule"] for i in chain["nftables"] if "rule" in i]
    assert sum("masquerade" in json.dumps(r) for r in rules) == 4, rules  # masq_nets and masq_pods, v4 and v6
    assert node.masqueraded() == ["10.22.0.3", "10.22.0.4"]  # c1's element went with the table
    for cid in ("c2", "c3"):
        assert node.plugin("DEL", conf, cid=cid, netns="").rc == 0
    assert node.masqueraded() == []


def test_check_needs_prev_result(node: Node) -> None:
    pod = node.pod()
    conf, _ = _added(node, pod)
    out = node.plugin("CHECK", conf, cid="c1", netns=pod.path)
    assert out.rc == 1 and out.json["code"] == 7 and "prevResult" in out.json["details"]


def test_status(node: Node) -> None:
    conf = weft_conf(version="1.1.0", data_dir=node.data_dir,
                     ipam={"subnet": "10.22.0.0/29", "rangeStart": "10.22.0.2", "rangeEnd": "10.22.0.2"})
    assert node.plugin("STATUS", conf).rc == 0
    pod = node.pod()
    assert node.plugin("ADD", conf, cid="only", netns=pod.path).rc == 0
    out = node.plugin("STATUS", conf)
    assert out.rc == 1 and out.json["code"] == 50 and "10.22.0.2-10.22.0.2" in out.json["details"]
    out = node.plugin("STATUS", conf, plugin="weft-ipam")
    assert out.rc == 1 and out.json["code"] == 50


def test_status_unusable_store(node: Node) -> None:
    blocker = node.dir / "blocked"
    blocker.write_text("not a directory")
    conf = weft_conf(version="1.1.0", data_dir=blocker)
    out = node.plugin("STATUS", conf)
    assert out.rc == 1 and out.json["code"] == 50 and "unusable" in out.json["details"]


def test_gc_keeps_valid_and_frees_the_rest(node: Node) -> None:
    conf = weft_conf(version="1.1.0", data_dir=node.data_dir, ipMasq=True)
    pods = [node.pod(f"p{i}") for i in range(3)]
    for i, pod in enumerate(pods):
        assert node.plugin("ADD", conf, cid=f"g{i}", netns=pod.path).rc == 0
    # A lease whose owner is unreadable (a corrupted file) is not kept either.
    (node.data_dir / "weftnet" / "10.22.0.99").write_bytes(b"\x00garbage")
    gc = {**conf, "cni.dev/valid-attachments": [{"containerID": "g0", "ifname": "eth0"}]}
    out = node.plugin("GC", gc)
    assert out.rc == 0 and out.stdout == "", out.stdout
    assert node.reservations("weftnet") == {"10.22.0.2": "g0\r\neth0"}
    assert node.masqueraded() == ["10.22.0.2"]
    assert {n for n in node.ns.links() if n.startswith("weft")} == {host_veth_name("g0", "eth0")}
    assert "eth0" in pods[0].links() and "eth0" not in pods[1].links() and "eth0" not in pods[2].links()


def test_gc_leaves_foreign_rules_and_links(node: Node) -> None:
    node.ns.run("nft", "add", "table", "inet", "someone_else")
    node.ns.run("nft", "add", "chain", "inet", "someone_else", "c")
    node.ns.run("nft", "add", "rule", "inet", "someone_else", "c", "masquerade", "comment", '"weft:lookalike"')
    node.ns.run("ip", "link", "add", "weftdeadbeef", "type", "veth", "peer", "name", "peer0")
    conf = weft_conf(version="1.1.0", data_dir=node.data_dir, ipMasq=True)
    assert node.plugin("GC", {**conf, "cni.dev/valid-attachments": []}).rc == 0
    assert "weft:lookalike" in node.ns.run("nft", "list", "ruleset").stdout
    assert "weftdeadbeef" in node.ns.links()
