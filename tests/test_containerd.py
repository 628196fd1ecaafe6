"""End to end with the real runtime: a private containerd in a node namespace runs busybox
containers with `ctr run --cni`, through the installed frozen binaries and a conflist of
weft + weft-ipam chained with the reference portmap."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd import IMAGE, Containerd, busybox_archive
from tests.lab import REFERENCE_DIR, SOCKET_DIR, Lab, Node, file_store, install_bundle, weftd_command, weftd_exe

SERVE = ("mkdir -p /www && echo hello-from-srv > /www/index.html && ip -4 -o addr show eth0 && "
         "exec httpd -f -p 8080 -h /www")


@pytest.fixture
def containerd(lab: Lab, node: Node, bundle: Path, tmp_path: Path) -> Iterator[Containerd]:
    ctrd = Containerd(node.ns, tmp_path / "containerd", f"weft-e2e-{lab.tag}")
    # The kind layout: the bundle inside the CNI bin dir, the plugins relative links into it.
    install_bundle(bundle, ctrd.cni / "bin" / ".weft", ctrd.cni / "bin")
    (ctrd.cni / "bin" / "portmap").symlink_to(REFERENCE_DIR / "portmap")
    try:
        ctrd.start()
        ctrd.ctr("images", "import", str(busybox_archive()))
        yield ctrd
    finally:
        ctrd.stop()


def start_server(containerd: Containerd) -> tuple[subprocess.Popen[str], str]:
    """The `srv` container serving HTTP on 8080, and its address."""
    server = subprocess.Popen(containerd.run_cni("--rm", IMAGE, "srv", "sh", "-c", SERVE),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=containerd.env)
    assert server.stdout is not None
    return server, _address(server.stdout.readline())


def _address(line: str) -> str:
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", line)
    assert m, line
    return m.group(1)


def test_containers_on_weft_reach_each_other_and_leave_nothing(containerd: Containerd, node: Node) -> None:
    data = node.dir / "ipam"
    (containerd.cni / "net.d" / "10-weft.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "weft-e2e", "plugins": [
            {"type": "weft", "bridge": "cni0", "isGateway": True, "isDefaultGateway": True, "ipMasq": True,
             "hairpinMode": True, "ipam": {"type": "weft-ipam", "subnet": "10.88.7.0/24", "dataDir": str(data)}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}))

    server, srv_ip = start_server(containerd)
    try:
        client = subprocess.run(
            containerd.run_cni("--rm", IMAGE, "cli", "sh", "-c",
                               f"ip -4 -o addr show eth0 && ping -c1 -W2 {srv_ip} >/dev/null && "
                               f"wget -qO- http://{srv_ip}:8080/"),
            capture_output=True, text=True, env=containerd.env, timeout=120)
        assert client.returncode == 0, client.stdout + client.stderr
        first, body = client.stdout.splitlines()[:2]
        cli_ip = _address(first)
        assert srv_ip != cli_ip and {srv_ip, cli_ip} <= {f"10.88.7.{i}" for i in range(2, 255)}
        assert body == "hello-from-srv"
        # The client is gone: its DEL ran when ctr removed it; the server's attachment is still there.
        assert sorted(p.name for p in (data / "weft-e2e").iterdir() if p.name[0].isdigit()) == [srv_ip]
        ports = [n for n, link in node.ns.links().items() if link.get("master") == "cni0"]
        assert len(ports) == 1
    finally:
        containerd.ctr("tasks", "kill", "-s", "KILL", "srv", check=False)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and containerd.ctr("containers", "ls", "-q").stdout.strip():
        time.sleep(0.2)
    assert containerd.ctr("containers", "ls", "-q").stdout.strip() == ""
    assert [n for n, link in node.ns.links().items() if link.get("master") == "cni0" or n.startswith("weft")] == []
    assert [p.name for p in (data / "weft-e2e").iterdir() if p.name[0].isdigit()] == []
    assert node.masqueraded() == []


def test_frozen_weftd_serves_the_frozen_plugin_under_containerd(containerd: Containerd, lab: Lab, node: Node,
                                                                 bundle: Path) -> None:
    """The frozen weftd writes the conflist (weft + weft-ipam + portmap) and takes the plugin's
    invocations; containerd hands the plugin /proc/<pid>/ns/net, which weftd receives open."""
    peer = lab.netns("underlay")
    node.ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer.name)
    node.ns.run("ip", "addr", "add", "192.168.90.1/24", "dev", "eth0")
    node.ns.run("ip", "link", "set", "eth0", "up")
    (node.dir / "net-conf.json").write_text(json.dumps({"Network": "10.90.0.0/16", "Backend": {"Type": "host-gw"}}))
    sock = SOCKET_DIR / f"{lab.tag}-weftd.sock"
    weftd = subprocess.Popen(
        weftd_command(node.ns, weftd_exe(bundle), "n1", file_store(node.dir / "store.json"), node.dir / "net-conf.json",
                      node.dir / "subnet.env", containerd.cni / "net.d", sock, node.dir / "ipam"),
        stdout=subprocess.DEVNULL, stderr=open(node.dir / "weftd.log", "ab"))
    try:
        conflist = containerd.cni / "net.d" / "10-weft.conflist"
        deadline = time.monotonic() + 120  # weftd's start on a loaded machine
        while not conflist.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        plugins = json.loads(conflist.read_text())["plugins"]
        assert [p["type"] for p in plugins] == ["weft", "portmap"] and plugins[0]["daemonSocket"] == str(sock)
        assert plugins[0]["ipam"]["type"] == "weft-ipam"

        server, srv_ip = start_server(containerd)
        try:
            client = subprocess.run(
                containerd.run_cni("--rm", IMAGE, "cli", "sh", "-c", f"wget -qO- http://{srv_ip}:8080/"),
                capture_output=True, text=True, env=containerd.env, timeout=120)
            assert client.stdout.strip() == "hello-from-srv", client.stderr
        finally:
            containerd.ctr("tasks", "kill", "-s", "KILL", "srv", check=False)
            server.wait(60)
        metrics = node.ns.run("python3", "-c", "import urllib.request;print(urllib.request.urlopen("
                              "'http://127.0.0.1:9808/metrics',timeout=30).read().decode())").stdout
        for command in ("ADD", "DEL"):
            assert f'weft_cni_requests_total{{command="{command}",result="ok"}} 2.0' in metrics, metrics[-1500:]
        assert [n for n in node.ns.links() if n.startswith("weft")] == []
        assert [p.name for p in (node.dir / "ipam" / "weft").iterdir() if p.name[0].isdigit()] == []
    finally:
        weftd.terminate()
        weftd.wait(15)
    assert not sock.exists()
