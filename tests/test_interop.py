"""Weft with Debian's reference plugins: host-local under weft, weft-ipam under bridge, weft + portmap."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.lab import Netns, Node, ping, weft_conf


def _add_two(node: Node, conflist: Path, prefix: str) -> tuple[list[Netns], list[str]]:
    """Two pods attached through libcni; their netns and first addresses."""
    pods = [node.pod(f"p{i}") for i in range(2)]
    ips = [node.drive("add", conflist, f"{prefix}{i}", p.path).json["ips"][0]["address"] for i, p in enumerate(pods)]
    return pods, ips


def _check_and_delete(node: Node, conflist: Path, prefix: str, pods: list[Netns]) -> None:
    for i, p in enumerate(pods):
        node.drive("check", conflist, f"{prefix}{i}", p.path)
        node.drive("del", conflist, f"{prefix}{i}", p.path)


def test_host_local_under_weft(node: Node) -> None:
    conf = weft_conf(data_dir=node.data_dir, ipam={"type": "host-local"})
    conflist = node.write_conflist("weftnet", [conf])
    pods, ips = _add_two(node, conflist, "h")
    assert ips == ["10.22.0.2/24", "10.22.0.3/24"]
    assert node.reservations("weftnet") == {"10.22.0.2": "h0\r\neth0", "10.22.0.3": "h1\r\neth0"}
    assert ping(pods[0], "10.22.0.3")
    _check_and_delete(node, conflist, "h", pods)
    assert node.reservations("weftnet") == {}


def test_weft_ipam_under_reference_bridge(node: Node) -> None:
    conf = {"type": "bridge", "bridge": "cni0", "isGateway": True, "isDefaultGateway": True,
            "ipam": {"type": "weft-ipam", "subnet": "10.23.0.0/24", "dataDir": str(node.data_dir)}}
    conflist = node.write_conflist("refnet", [conf])
    pods, ips = _add_two(node, conflist, "b")
    assert ips == ["10.23.0.2/24", "10.23.0.3/24"]
    assert ping(pods[1], "10.23.0.2")
    _check_and_delete(node, conflist, "b", pods)
    assert node.reservations("refnet") == {}


def test_one_store_shared_by_host_local_and_weft_ipam(node: Node) -> None:
    ipam = {"cniVersion": "1.0.0", "name": "shared",
            "ipam": {"subnet": "10.24.0.0/29", "dataDir": str(node.data_dir)}}
    def conf(kind: str) -> dict[str, object]:
        return {**ipam, "ipam": {**ipam["ipam"], "type": kind}}  # type: ignore[dict-item]
    got = []
    for i in range(4):
        kind = "host-local" if i % 2 == 0 else "weft-ipam"
        out = node.plugin("ADD", conf(kind), plugin=kind, cid=f"s{i}", netns="/dev/null")
        assert out.rc == 0, out.stdout
        got.append(out.json["ips"][0]["address"])
    assert len(set(got)) == 4
    # Each plugin releases the other's leases, and round-robin continues where the other stopped.
    assert node.plugin("DEL", conf("weft-ipam"), plugin="weft-ipam", cid="s0").rc == 0
    assert node.plugin("DEL", conf("host-local"), plugin="host-local", cid="s1").rc == 0
    assert set(node.reservations("shared")) == {got[2].split("/")[0], got[3].split("/")[0]}
    nxt = node.plugin("ADD", conf("weft-ipam"), plugin="weft-ipam", cid="s4", netns="/dev/null").json
    assert nxt["ips"][0]["address"] == "10.24.0.6/29"
    for i in (2, 3, 4):
        assert node.plugin("DEL", conf("host-local"), plugin="host-local", cid=f"s{i}").rc == 0
    assert node.reservations("shared") == {}


def test_weft_then_portmap(node: Node) -> None:
    conflist = node.write_conflist("pmnet", [
        weft_conf(network="pmnet", data_dir=node.data_dir, ipMasq=True),
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ])
    pod = node.pod()
    caps = json.dumps({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
    res = node.drive("add", conflist, "pm", pod.path, CNIDRIVE_CAPS=caps).json
    ip = res["ips"][0]["address"].split("/")[0]
    server = node.lab.base / "served"
    server.mkdir()
    (server / "hello").write_text("from the pod\n")
    import subprocess
    import sys

    srv = subprocess.Popen(["ip", "netns", "exec", pod.name, sys.executable, "-m", "http.server", "80",
                            "--bind", ip, "--directory", str(server)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = ""
        deadline = time.monotonic() + 60  # until the pod's server answers
        while time.monotonic() < deadline:
            p = node.ns.run(sys.executable, "-c",
                            "import urllib.request;print(urllib.request.urlopen('http://10.22.0.1:8080/hello',"
                            "timeout=2).read().decode())", check=False)
            if p.returncode == 0:
                body = p.stdout
                break
            time.sleep(0.1)
        assert body.strip() == "from the pod"
        # Debian's portmap 1.1.1 fails CHECK on IPv4-only pods behind the reference bridge too
        # ("could not check ipv6 dnat"), so weft's own CHECK is run with the chain's final result.
        conf = {**weft_conf(network="pmnet", data_dir=node.data_dir, ipMasq=True), "prevResult": res}
        assert node.plugin("CHECK", conf, cid="pm", netns=pod.path).rc == 0
    finally:
        srv.kill()
        srv.wait()
    node.drive("del", conflist, "pm", pod.path, CNIDRIVE_CAPS=caps)
    assert node.reservations("pmnet") == {}
    rules = node.ns.run("nft", "list", "ruleset").stdout
    assert "8080" not in rules and ip not in rules
