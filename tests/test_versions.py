"""Every supported cniVersion gets a result in its own format; anything else is refused with code 1."""

from __future__ import annotations

import pytest

from tests.lab import Node, weft_conf

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def test_version_command(node: Node) -> None:
    out = node.plugin("VERSION", {"cniVersion": "1.0.0"})
    assert out.rc == 0
    assert out.json == {"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}
    assert node.plugin("VERSION", "", plugin="weft-ipam").json["supportedVersions"] == SUPPORTED


@pytest.mark.parametrize("version", SUPPORTED)
def test_add_result_in_each_version(node: Node, version: str) -> None:
    pod = node.pod()
    conf = weft_conf(version=version, data_dir=node.data_dir, mtu=1400)
    out = node.plugin("ADD", conf, cid="v1", netns=pod.path)
    assert out.rc == 0, out.stdout
    res = out.json
    assert res["cniVersion"] == version
    ip = res["ips"][0]
    if version < "1.0.0":
        assert ip["version"] == "4"
    else:
        assert "version" not in ip
    container = res["interfaces"][ip["interface"]]
    assert container["name"] == "eth0" and container["sandbox"] == pod.path
    assert ("mtu" in container) == (version == "1.1.0")
    assert pod.links()["eth0"]["mtu"] == 1400
    if version >= "0.4.0":
        check = node.plugin("CHECK", {**conf, "prevResult": res}, cid="v1", netns=pod.path)
        assert check.rc == 0 and check.stdout == "", check.stdout
    else:
        check = node.plugin("CHECK", {**conf, "prevResult": res}, cid="v1", netns=pod.path)
        assert check.rc == 1 and check.json["code"] == 1
    assert node.plugin("DEL", conf, cid="v1", netns=pod.path).rc == 0
    assert node.reservations("weftnet") == {}


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_libcni_converts_each_version(node: Node, version: str) -> None:
    conflist = node.write_conflist("weftnet", [weft_conf(data_dir=node.data_dir)], version=version)
    pod = node.pod()
    res = node.drive("add", conflist, "lv", pod.path).json
    assert res["cniVersion"] == version
    if version >= "0.4.0":
        node.drive("check", conflist, "lv", pod.path)
    node.drive("del", conflist, "lv", pod.path)
    assert node.reservations("weftnet") == {}


@pytest.mark.parametrize("bad", ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "", None, 1])
def test_unsupported_version_refused(node: Node, bad: object) -> None:
    pod = node.pod()
    before = node.snapshot()
    conf = weft_conf(data_dir=node.data_dir)
    conf["cniVersion"] = bad
    out = node.plugin("ADD", conf, cid="bad", netns=pod.path)
    assert out.rc != 0
    assert out.json["code"] == 1
    assert node.snapshot() == before


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_new_verbs_need_1_1_0(node: Node, command: str) -> None:
    out = node.plugin(command, weft_conf(version="1.0.0", data_dir=node.data_dir))
    assert out.rc == 1 and out.json["code"] == 1
    out = node.plugin(command, weft_conf(version="1.1.0", data_dir=node.data_dir))
    assert out.rc == 0 and out.stdout == ""


def test_chained_after_another_plugin_keeps_prev_result(node: Node) -> None:
    pod = node.pod()
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "dummy0", "sandbox": pod.path}],
            "ips": [{"address": "192.0.2.9/32", "interface": 0}], "dns": {"nameservers": ["192.0.2.53"]}}
    conf = {**weft_conf(data_dir=node.data_dir), "prevResult": prev}
    res = node.plugin("ADD", conf, cid="ch", netns=pod.path).json
    assert res["interfaces"][0]["name"] == "dummy0"
    assert [i["name"] for i in res["interfaces"][1:]][::2] == ["cni0", "eth0"]
    assert res["ips"][0] == prev["ips"][0]
    assert res["ips"][1]["interface"] == 3
    assert res["dns"] == prev["dns"]
    assert node.plugin("DEL", conf, cid="ch", netns=pod.path).rc == 0
