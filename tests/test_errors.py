"""Bad input gets CNI error JSON with the right code, a non-zero exit, no traceback, and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.lab import Node, Outcome, weft_conf


def assert_error(out: Outcome, code: int, *words: str) -> dict[str, Any]:
    assert out.rc != 0
    assert "Traceback" not in out.stdout + out.stderr
    err = json.loads(out.stdout)
    assert set(err) == {"cniVersion", "code", "msg", "details"}, err
    assert err["code"] == code, err
    for w in words:
        assert w in err["details"], err
    return err


ENV_CASES = {
    "no container id": ({"cid": ""}, ["CNI_CONTAINERID"]),
    "bad container id": ({"cid": "../../etc"}, ["CNI_CONTAINERID"]),
    "no ifname": ({"ifname": ""}, ["CNI_IFNAME"]),
    "long ifname": ({"ifname": "a" * 16}, ["longer than 15"]),
    "ifname with slash": ({"ifname": "eth/0"}, ["CNI_IFNAME"]),
    "netns missing": ({"netns": "/run/netns/does-not-exist"}, ["does not exist"]),
    "netns not a netns": ({"netns": "/etc/hostname"}, ["not a network namespace"]),
    "netns relative": ({"netns": "run/netns/x"}, ["absolute"]),
    "bad CNI_ARGS": ({"args": "IP"}, ["CNI_ARGS"]),
}


@pytest.mark.parametrize("case", ENV_CASES)
def test_invalid_environment(node: Node, case: str) -> None:
    pod = node.pod()
    kw: dict[str, Any] = {"cid": "ok", "netns": pod.path, "ifname": "eth0"}
    change, words = ENV_CASES[case]
    kw.update(change)
    before = node.snapshot()
    assert_error(node.plugin("ADD", weft_conf(data_dir=node.data_dir), **kw), 4, *words)
    assert node.snapshot() == before


def test_unknown_command(node: Node) -> None:
    assert_error(node.plugin("FROB", weft_conf(data_dir=node.data_dir)), 4, "CNI_COMMAND")


def test_own_netns_refused(node: Node) -> None:
    before = node.snapshot()
    assert_error(node.plugin("ADD", weft_conf(data_dir=node.data_dir), cid="x", netns=node.ns.path), 4,
                 "own network namespace")
    assert node.snapshot() == before


def test_ifname_already_in_pod(node: Node) -> None:
    pod = node.pod()
    pod.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    before = node.snapshot()
    assert_error(node.plugin("ADD", weft_conf(data_dir=node.data_dir), cid="x", netns=pod.path), 4, "already exists")
    assert node.snapshot() == before
    assert "eth0" in pod.links()


@pytest.mark.parametrize("raw", [b"{", b"[]", b"\"x\"", b"\xff\xfe", b"{" * 100000, b" " * (2 << 20)])
def test_undecodable_config(node: Node, raw: bytes) -> None:
    pod = node.pod()
    before = node.snapshot()
    assert_error(node.plugin("ADD", raw, cid="x", netns=pod.path), 6)
    assert node.snapshot() == before


def _conf(node: Node, **change: Any) -> dict[str, Any]:
    conf = weft_conf(data_dir=node.data_dir)
    for k, v in change.items():
        if k.startswith("ipam_"):
            conf["ipam"][k[5:]] = v
        elif v is None:
            conf.pop(k, None)
        else:
            conf[k] = v
    return conf


CONFIG_CASES = {
    "no name": ({"name": None}, "network name"),
    "name with slash": ({"name": "a/b"}, "network name"),
    "no ipam": ({"ipam": None}, "ipam"),
    "ipam not object": ({"ipam": "host-local"}, "ipam"),
    "mtu as string": ({"mtu": "1500"}, "mtu"),
    "mtu too small": ({"mtu": 10}, "mtu"),
    "isGateway as string": ({"isGateway": "yes"}, "isGateway"),
    "bridge name too long": ({"bridge": "b" * 20}, "bridge name"),
    "hairpin and promisc": ({"hairpinMode": True, "promiscMode": True}, "hairpin"),
    "subnet host bits": ({"ipam_subnet": "10.22.0.5/24"}, "host bits"),
    "subnet garbage": ({"ipam_subnet": "ten/24"}, "invalid subnet"),
    "subnet too small": ({"ipam_subnet": "10.22.0.0/31"}, "too small"),
    "rangeStart outside": ({"ipam_rangeStart": "10.99.0.5"}, "not in network"),
    "range reversed": ({"ipam_rangeStart": "10.22.0.50", "ipam_rangeEnd": "10.22.0.40"}, "after rangeEnd"),
    "overlapping range sets": ({"ipam_ranges": [[{"subnet": "10.22.1.0/24"}], [{"subnet": "10.22.1.0/25"}]]},
                               "overlaps"),
    "overlap with legacy subnet": ({"ipam_ranges": [[{"subnet": "10.22.0.0/16"}]]}, "overlaps"),
    "mixed families in a set": ({"ipam_subnet": None, "ipam_ranges": [[{"subnet": "10.22.1.0/24"},
                                                                        {"subnet": "fd00::/64"}]]}, "mixed"),
    "relative dataDir": ({"ipam_dataDir": "var/lib"}, "dataDir"),
    "dataDir traversal": ({"ipam_dataDir": "/tmp/../etc"}, "dataDir"),
    "bad route": ({"ipam_routes": [{"dst": "nowhere"}]}, "route"),
    "no ranges": ({"ipam_subnet": None}, "no IP ranges"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_invalid_config(node: Node, case: str) -> None:
    change, word = CONFIG_CASES[case]
    conf = _conf(node, **change)
    if conf.get("ipam") and isinstance(conf["ipam"], dict) and conf["ipam"].get("subnet") is None:
        conf["ipam"].pop("subnet", None)
    pod = node.pod()
    before = node.snapshot()
    assert_error(node.plugin("ADD", conf, cid="x", netns=pod.path), 7, word)
    assert node.snapshot() == before


def test_unsupported_bridge_option(node: Node) -> None:
    pod = node.pod()
    before = node.snapshot()
    assert_error(node.plugin("ADD", _conf(node, vlan=5), cid="x", netns=pod.path), 2, "vlan")
    assert node.snapshot() == before


def test_exhausted_range_names_it_and_changes_nothing(node: Node) -> None:
    conf = _conf(node, ipam_subnet="10.22.0.0/29", ipam_rangeStart="10.22.0.2", ipam_rangeEnd="10.22.0.3")
    pods = [node.pod(f"p{i}") for i in range(3)]
    for i in range(2):
        assert node.plugin("ADD", conf, cid=f"c{i}", netns=pods[i].path).rc == 0
    before = node.snapshot()
    err = assert_error(node.plugin("ADD", conf, cid="c2", netns=pods[2].path), 11, "10.22.0.2-10.22.0.3")
    assert "range" in err["msg"]
    assert node.snapshot() == before
    assert "eth0" not in pods[2].links()


def test_bridge_address_conflict_rolls_back(node: Node) -> None:
    node.ns.run("ip", "link", "add", "cni0", "type", "bridge")
    node.ns.run("ip", "addr", "add", "10.99.0.1/24", "dev", "cni0")
    pod = node.pod()
    before = node.snapshot()
    assert_error(node.plugin("ADD", _conf(node), cid="x", netns=pod.path), 7, "already has an IP address")
    assert node.snapshot() == before
    # forceAddress replaces it.
    assert node.plugin("ADD", _conf(node, forceAddress=True), cid="x", netns=pod.path).rc == 0
    addrs = node.ns.run("ip", "-4", "addr", "show", "cni0").stdout
    assert "10.22.0.1/24" in addrs and "10.99.0.1" not in addrs


def test_failure_after_veth_rolls_everything_back(node: Node) -> None:
    # The kernel refuses a route through an unreachable gateway; by then the lease, bridge,
    # veth and masquerade rule exist, and all must go. (The store's round-robin position moves on,
    # as it does in host-local.)
    conf = _conf(node, ipMasq=True, ipam_routes=[{"dst": "192.0.2.0/24", "gw": "198.51.100.1"}])
    pod = node.pod()
    before = node.snapshot()
    out = node.plugin("ADD", conf, cid="x", netns=pod.path)
    assert out.rc != 0 and "Traceback" not in out.stdout + out.stderr
    after = node.snapshot()
    assert after["links"] == before["links"]
    assert node.reservations("weftnet") == {}
    assert node.masqueraded() == [] and "10.22.0.2" not in after["rules"]
    assert pod.links().keys() == {"lo"}


def test_existing_non_bridge_named_like_the_bridge(node: Node) -> None:
    node.ns.run("ip", "link", "add", "cni0", "type", "veth", "peer", "name", "other0")
    pod = node.pod()
    before = node.snapshot()
    assert_error(node.plugin("ADD", _conf(node), cid="x", netns=pod.path), 7, "not a bridge")
    assert node.snapshot() == before


def test_missing_ipam_plugin(node: Node) -> None:
    pod = node.pod()
    before = node.snapshot()
    assert_error(node.plugin("ADD", _conf(node, ipam={"type": "nope", "subnet": "10.1.0.0/24"}), cid="x",
                             netns=pod.path), 7, "nope")
    assert node.snapshot() == before
