"""The wireguard backend on three simulated nodes, through wireguard-go (this kernel has no module);
the kernel path runs where the module exists."""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import netaddr
import pytest

from tests.cluster import Cluster, ClusterNode, MakeCluster
from tests.lab import Lab, Netns, Pinger, assert_path_mtu, ping
from tests.test_weftd import pods_on_every_node_talk

PSK = base64.b64encode(bytes(range(32))).decode()
MARKER = b"WEFT-CLEARTEXT-MARKER-7f3a"


def subnet(cn: ClusterNode) -> str:
    return cn.state()["WEFT_SUBNET"].replace(".1/", ".0/")


def public_key(c: Cluster, cn: ClusterNode) -> str:
    lease = json.loads((c.dir / "store.json").read_text())["leases"][cn.name]
    return str(lease["BackendData"]["PublicKey"])


def key_file(cn: ClusterNode) -> Path:
    return cn.state_dir / "wireguard.key"


def udp_send(src: Netns, dst: Netns, dst_ip: str, payload: bytes, count: int = 5, family: int = 4) -> bytes:
    """Sends `payload` from `src` to `dst_ip`:7001 and returns what the receiver in `dst` got."""
    af = "AF_INET6" if family == 6 else "AF_INET"
    code = (f"import socket,sys;s=socket.socket(socket.{af},socket.SOCK_DGRAM);"
            f"s.bind(('{dst_ip}',7001));s.settimeout(10);print('up',flush=True);"
            "d=s.recv(4096);sys.stdout.write(d.hex()+'\\n')")
    rcv = subprocess.Popen(["ip", "netns", "exec", dst.name, sys.executable, "-c", code], stdout=subprocess.PIPE,
                           text=True)
    try:
        assert rcv.stdout is not None and rcv.stdout.readline().strip() == "up"
        send = (f"import socket,time;s=socket.socket(socket.{af},socket.SOCK_DGRAM)\n"
                f"for _ in range({count}): s.sendto(bytes.fromhex('{payload.hex()}'),('{dst_ip}',7001)); "
                "time.sleep(0.05)")
        src.run(sys.executable, "-c", send)
        out, _ = rcv.communicate(timeout=15)
        return bytes.fromhex(out.strip())
    finally:
        rcv.kill()
        rcv.wait()


def pcap_packets(path: Path) -> list[tuple[int, bytes]]:
    """(ethertype, network-layer bytes) of each packet of a `tcpdump -i any` capture (Linux cooked v1)."""
    data = path.read_bytes()
    magic, linktype = struct.unpack("<I", data[:4])[0], struct.unpack("<I", data[20:24])[0]
    assert (magic, linktype) == (0xA1B2C3D4, 113), "expected a microsecond pcap file of cooked (any) packets"
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack("<I", data[off + 8:off + 12])[0]
        frame = data[off + 16:off + 16 + incl]
        out.append((struct.unpack(">H", frame[14:16])[0], frame[16:]))
        off += 16 + incl
    return out


def time_until(cond: object, timeout: float = 60) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError("condition not met")


def test_three_nodes_pods_talk_only_encrypted(make_cluster: MakeCluster) -> None:
    c = make_cluster("wireguard", PSK=PSK, PersistentKeepaliveInterval=25)
    n1, n2, n3 = c.boot()
    dev = n1.ns.links()[n1.wg_device]
    assert dev["mtu"] == 1440 and dev["linkinfo"]["info_kind"] == "tun"
    assert n1.state()["WEFT_MTU"] == "1440"
    assert [(r["dst"], r["dev"], r.get("scope")) for r in n1.routes()] == [("10.244.0.0/16", n1.wg_device, "link")]
    peers = c.wg_peers(n1)
    assert set(peers) == {public_key(c, n2), public_key(c, n3)}
    for cn in (n2, n3):
        p = peers[public_key(c, cn)]
        assert (p["endpoint"], p["allowed_ips"], p["keepalive"]) == (f"{cn.ip}:51820", subnet(cn), "25")
        assert p["psk"] == PSK
    pods_on_every_node_talk(c, mtu=1440)
    a, a_ip = n1.pods["pod-n1"]
    b, b_ip = n2.pods["pod-n2"]

    # Everything between the nodes, on every port of the underlay, while pods exchange a marker.
    pcap = c.dir / "underlay.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", c.underlay.name, "tcpdump", "-i", "any", "-y", "LINUX_SLL", "-n",
                             "--immediate-mode", "-U", "-s", "0",
                             "-w", str(pcap)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        while "listening on" not in (line := dump.stderr.readline()):
            assert line, "tcpdump did not start"
        assert udp_send(a, b, b_ip, MARKER) == MARKER
        assert ping(b, a_ip)
        assert ping(n3.pods["pod-n3"][0], a_ip)
        time.sleep(0.3)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.communicate(timeout=10)
    nodes = {n.ip for n in (n1, n2, n3)}
    udp = 0
    for ethertype, f in pcap_packets(pcap):
        assert MARKER not in f
        if ethertype != 0x0800:
            continue  # ARP and IPv6 link-local chatter carry no pod traffic: the marker check covers them
        ihl = (f[0] & 0x0F) * 4
        src, dst = ".".join(map(str, f[12:16])), ".".join(map(str, f[16:20]))
        assert f[9] == 17, f"non-UDP IPv4 packet {src} -> {dst} on the underlay"
        sport, dport = struct.unpack(">HH", f[ihl:ihl + 4])
        assert {src, dst} <= nodes and 51820 in (sport, dport), f"{src}:{sport} -> {dst}:{dport}"
        assert not src.startswith("10.244.") and not dst.startswith("10.244.")
        udp += 1
    assert udp >= 10  # the marker datagrams and the pings did cross, encrypted

    _, health = n1.http("/healthz")
    assert health.splitlines()[0] == "ok" and f"wireguard: userspace (wireguard-go pid {c.wireguard_go(n1)}" in health
    _, metrics = n1.http("/metrics")
    assert f'weft_wireguard_implementation{{device="{n1.wg_device}",implementation="userspace"}} 1.0' in metrics
    assert "weft_wireguard_peers 2.0" in metrics


def test_restarted_node_keeps_key_and_peers_reconnect(make_cluster: MakeCluster) -> None:
    c = make_cluster("wireguard")
    n1, n2, _ = c.boot()
    a, _ = c.pod(n1, "a")
    b, b_ip = c.pod(n2, "b")
    assert ping(a, b_ip)
    key, stored = public_key(c, n1), key_file(n1).read_text()
    assert os.stat(key_file(n1)).st_mode & 0o777 == 0o600
    assert stored.strip() not in n1.log.read_text()  # the private key is never logged
    pid = c.wireguard_go(n1)

    # weftd restarts: wireguard-go is the device and stays, the new weftd adopts it; no ping is lost.
    with Pinger(a, b_ip, 0.02) as pings:  # from before the stop until weftd is ready again, however long
        c.stop(n1)
        c.start(n1)
        c.wait_ready(n1)
    assert pings.sent > 1 and pings.failures() == [], "".join(pings.lines)[-300:]
    assert c.wireguard_go(n1) == pid
    assert "adopted wireguard-go" in n1.log.read_text()

    # The node reboots: weftd and the device go away; the key stays on disk.
    c.stop(n1)
    c.stop_wireguard_go(n1)
    assert not ping(a, b_ip, once=True)
    t0 = time.monotonic()
    c.start(n1)
    took = time_until(lambda: ping(a, b_ip, "-W", "0.3", once=True))
    print(f"pod traffic back {time.monotonic() - t0:.2f}s after weftd started on the rebooted node ({took:.2f}s)")
    assert key_file(n1).read_text() == stored and public_key(c, n1) == key
    assert key in c.wg_peers(n2)
    c.wait_ready(n1)
    assert ping(b, c.nodes["n1"].pods["a"][1])


def test_drift_on_the_device_is_repaired(make_cluster: MakeCluster) -> None:
    """Peers are reconciled periodically, not only on store events (flannel#1770, k3s#5216)."""
    c = make_cluster("wireguard")
    n1, n2, _ = c.boot()
    a, _ = c.pod(n1, "a")
    _, b_ip = c.pod(n2, "b")
    k2, stray = public_key(c, n2), base64.b64encode(b"\x42" * 32).decode()
    dev = n1.wg_device
    n1.ns.run("wg", "set", dev, "peer", k2, "endpoint", "192.168.77.99:51820", "allowed-ips", "10.244.250.0/24")
    n1.ns.run("wg", "set", dev, "peer", stray, "allowed-ips", "10.99.0.0/24")
    n1.ns.run("ip", "route", "del", "10.244.0.0/16", "dev", dev)

    def repaired() -> bool:
        peers = c.wg_peers(n1)
        return (stray not in peers and peers.get(k2, {}).get("endpoint") == f"{n2.ip}:51820"
                and peers[k2]["allowed_ips"] == subnet(n2) and len(n1.routes()) == 1)

    c.until(repaired, 60, "device repaired", n1)
    log = n1.log.read_text()
    assert "fixed peer n2" in log and "endpoint 192.168.77.99:51820 -> 192.168.77.11:51820" in log
    assert f"removed peer unknown to the store ({stray})" in log
    assert ping(a, b_ip)


def test_removed_node_peer_disappears(make_cluster: MakeCluster) -> None:
    c = make_cluster("wireguard")
    n1, n2, n3 = c.boot()
    gone = public_key(c, n3)
    c.stop(n3)
    subprocess.run([sys.executable, "-m", "weftd", "remove-node", "--node-name", "n3", *c.store_args()], check=True,
                   capture_output=True)
    for cn in (n1, n2):
        c.until(lambda cn=cn: gone not in c.wg_peers(cn), 60, f"{cn.name} drops n3's peer", cn)
        assert len(c.wg_peers(cn)) == 1
        c.until(lambda cn=cn: "weft_wireguard_peers 1.0" in cn.http("/metrics")[1], 60, "metric", cn)
    assert "removed peer n3" in n1.log.read_text()


def test_key_rotation_propagates(make_cluster: MakeCluster) -> None:
    c = make_cluster("wireguard")
    n1, n2, n3 = c.boot()
    a, _ = c.pod(n1, "a")
    _, b_ip = c.pod(n2, "b")
    old = public_key(c, n1)
    c.stop(n1)
    key_file(n1).unlink()
    c.start(n1)
    c.wait_ready(n1)
    new = public_key(c, n1)
    assert new != old
    for cn in (n2, n3):
        c.until(lambda cn=cn: new in c.wg_peers(cn) and old not in c.wg_peers(cn), 60, f"{cn.name} has the new key",
                cn)
    assert ping(a, b_ip)


def test_duplicate_public_key_is_refused(make_cluster: MakeCluster) -> None:
    c = make_cluster("wireguard")
    n1, n2 = c.boot(["n1", "n2"])
    n3 = c.add_node("n3")
    n3.state_dir.mkdir()
    key_file(n3).write_bytes(key_file(n1).read_bytes())  # a cloned node
    os.chmod(key_file(n3), 0o600)
    c.start(n3)
    c.wait_ready(n3)
    c.until(lambda: "also claimed by" in n2.log.read_text(), 60, "n2 refuses the shared key", n2)
    assert public_key(c, n1) not in c.wg_peers(n2)
    assert len(c.wg_peers(n2)) == 0
    assert "not programming peer n3: its public key" in n1.log.read_text()


def test_killed_wireguard_go_is_restarted_and_traffic_resumes(make_cluster: MakeCluster) -> None:
    c = make_cluster("wireguard")
    n1, n2, _ = c.boot()
    a, _ = c.pod(n1, "a")
    _, b_ip = c.pod(n2, "b")
    old = c.wireguard_go(n1)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    took = time_until(lambda: ping(a, b_ip, "-W", "0.3", once=True))
    print(f"pod traffic back {took:.2f}s after wireguard-go was killed")
    new = c.wireguard_go(n1)
    assert new is not None and new != old
    log = n1.log.read_text()
    assert f"wireguard-go pid {old} for {n1.wg_device} exited (signal 9); restarting it" in log
    c.until(lambda: "weft_wireguard_userspace_restarts 1.0" in n1.http("/metrics")[1], 60, "restart metric", n1)
    assert len(c.wg_peers(n1)) == 2


def test_uninstall_stops_wireguard_go_and_keeps_the_key(make_cluster: MakeCluster) -> None:
    c = make_cluster("wireguard")
    n1, _ = c.boot(["n1", "n2"])
    c.stop(n1)
    c.uninstall(n1)
    assert c.wireguard_go(n1) is None
    assert n1.wg_device not in n1.ns.links()
    assert not Path(f"/var/run/wireguard/{n1.wg_device}.sock").exists()
    assert n1.routes() == []
    assert key_file(n1).exists()


def test_etcd_store_carries_the_public_keys(make_cluster: MakeCluster) -> None:
    from tests.test_etcd import etcd_keys

    c = make_cluster("wireguard", store="etcd", PSK=PSK)
    c.start_etcd()
    n1, n2 = c.boot(["n1", "n2"])
    leases: dict[str, Any] = {v["Node"]: v for k, v in json.loads(json.dumps(etcd_keys(c))).items()
                              if "/subnets/" in k}
    k1 = leases["n1"]["BackendData"]["PublicKey"]
    assert leases["n1"]["BackendData"]["Port"] == 51820 and leases["n1"]["BackendType"] == "wireguard"
    assert k1 == base64.b64encode(base64.b64decode(k1)).decode() and k1 in c.wg_peers(n2)
    assert c.wg_peers(n2)[k1]["psk"] == PSK
    a, _ = c.pod(n1, "a")
    _, b_ip = c.pod(n2, "b")
    assert ping(a, b_ip)


def test_frozen_weftd_runs_the_wireguard_backend(make_cluster: MakeCluster, bundle: Path) -> None:
    """Production runs the PyInstaller bundle: it must carry the wireguard backend and find wireguard-go and wg."""
    c = make_cluster("wireguard")
    c.weftd = [str(bundle / "weftd")]
    n1, n2 = c.boot(["n1", "n2"])
    a, _ = c.pod(n1, "a")
    _, b_ip = c.pod(n2, "b")
    assert ping(a, b_ip)
    assert public_key(c, n1) in c.wg_peers(n2)


def _kernel_wireguard(lab: Lab) -> bool:
    ns = lab.netns("wgprobe")
    return ns.run("ip", "link", "add", "wgprobe", "type", "wireguard", check=False).returncode == 0


def test_auto_picks_wireguard_go_without_the_module(lab: Lab) -> None:
    if _kernel_wireguard(lab):
        pytest.skip("this kernel has the WireGuard module: auto picks it (test_kernel_device_three_nodes)")
    ns = lab.netns("wgauto")
    code = ("from pyroute2 import IPRoute\nfrom weftd.backend.wireguard import open_device\n"
            "from weftd.backend.errors import BackendError\nipr=IPRoute()\n"
            "print(open_device(ipr,'wgauto0','auto').implementation)\n"
            "try: open_device(ipr,'wgauto0','kernel')\nexcept BackendError as e: print(e)\n"
            "print(sorted(l.get('IFLA_IFNAME') for l in ipr.get_links()))")
    out = ns.run(sys.executable, "-c", code).stdout.splitlines()
    assert out == ["userspace", "kernel WireGuard was asked for, but the kernel has no WireGuard module "
                   "(Operation not supported)", "['lo']"]


def test_kernel_device_three_nodes(make_cluster: MakeCluster, lab: Lab) -> None:
    if not _kernel_wireguard(lab):
        pytest.skip("this kernel has no WireGuard module; the kernel path is covered at the netlink-message level "
                    "in tests/unit/test_wireguard_units.py")
    c = make_cluster("wireguard")
    c.wireguard = "kernel"
    n1, _, _ = c.boot()
    assert n1.ns.links()[n1.wg_device]["linkinfo"]["info_kind"] == "wireguard"
    assert c.wireguard_go(n1) is None
    pods_on_every_node_talk(c)
    _, health = n1.http("/healthz")
    assert "wireguard: kernel" in health


DUAL = {"EnableIPv6": True, "IPv6Network": "fd00:10::/48"}


@pytest.mark.parametrize("mode", ["separate", "ipv6"])
def test_dual_stack_pods_talk_only_encrypted(make_cluster: MakeCluster, mode: str) -> None:
    """IPv6 pods across nodes: Mode separate, an IPv6 device over the nodes' IPv6 addresses on ListenPortV6
    beside the IPv4 one; Mode ipv6, one device carrying both families over the IPv6 underlay."""
    c = make_cluster("wireguard", net=DUAL, families=(4, 6), PSK=PSK, Mode=mode)
    nodes = c.boot()
    n1, n2, n3 = nodes
    port6 = 51821 if mode == "separate" else 51820

    def device6(cn: ClusterNode) -> str:
        return f"{cn.wg_device}-v6" if mode == "separate" else cn.wg_device

    dev6 = device6(n1)
    keys = {cn.name: json.loads((c.dir / "store.json").read_text())["leases"][cn.name]["BackendV6Data"]["PublicKey"]
            for cn in nodes}
    assert keys[n1.name] == public_key(c, n1)  # one key for both families

    def v6_peers(cn: ClusterNode) -> dict[str, dict[str, str]]:
        p = cn.ns.run("wg", "show", device6(cn), "dump")
        return {line.split("\t")[0]: dict(zip(("endpoint", "allowed_ips"), line.split("\t")[2:4], strict=True))
                for line in p.stdout.splitlines()[1:]}

    for cn in nodes:
        c.until(lambda cn=cn: len(v6_peers(cn)) == 2, 60, f"{cn.name}'s IPv6 peers", cn)
    peers = v6_peers(n1)
    for cn in (n2, n3):
        lease = json.loads((c.dir / "store.json").read_text())["leases"][cn.name]
        v6_subnet = lease["IPv6Subnet"]
        want = v6_subnet if mode == "separate" else ",".join(sorted([lease["Subnet"], v6_subnet]))
        assert peers[keys[cn.name]] == {"endpoint": f"[{cn.ip6}]:{port6}", "allowed_ips": want}
    links = n1.ns.links()
    assert links[dev6]["mtu"] == 1420  # 1500 - 80 over an IPv6 underlay
    if mode == "separate":
        assert links[n1.wg_device]["mtu"] == 1440
    assert n1.state()["WEFT_MTU"] == "1420"  # pods: the smaller, one interface sends both families
    assert [(r["dst"], r["dev"]) for r in n1.routes(6)] == [("fd00:10::/48", dev6)]
    assert [(r["dst"], r["dev"]) for r in n1.routes(4)] == [("10.244.0.0/16", n1.wg_device)]

    for cn in nodes:
        c.pod(cn, f"pod-{cn.name}")
    a, b = n1.pods["pod-n1"][0], n2.pods["pod-n2"][0]
    a6, b6, c6 = (cn.pod_ips[f"pod-{cn.name}"][1] for cn in nodes)
    assert ":" in a6
    for ns, _ in (n1.pods["pod-n1"], n2.pods["pod-n2"], n3.pods["pod-n3"]):
        for ip in (a6, b6, c6):
            assert ping(ns, ip), f"{ns.name} cannot reach {ip}"
    assert_path_mtu(a, b6, 1420)

    pcap = c.dir / "underlay.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", c.underlay.name, "tcpdump", "-i", "any", "-y", "LINUX_SLL", "-n",
                             "--immediate-mode", "-U", "-s", "0", "-w", str(pcap)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        while "listening on" not in (line := dump.stderr.readline()):
            assert line, "tcpdump did not start"
        assert udp_send(a, b, b6, MARKER, family=6) == MARKER
        assert ping(b, a6) and ping(n3.pods["pod-n3"][0], a6) and ping(b, n1.pods["pod-n1"][1])
        time.sleep(0.3)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.communicate(timeout=10)
    nodes6 = {cn.ip6 for cn in nodes}
    udp6 = udp4 = 0
    for ethertype, f in pcap_packets(pcap):
        assert MARKER not in f
        if ethertype == 0x0800:
            src, dst = ".".join(map(str, f[12:16])), ".".join(map(str, f[16:20]))
            assert not src.startswith("10.244.") and not dst.startswith("10.244.")
            assert mode == "separate" and f[9] == 17, f"IPv4 packet {src} -> {dst} on the underlay"
            udp4 += 1
        elif ethertype == 0x86DD:
            src6, dst6 = (str(netaddr.IPAddress(int.from_bytes(f[o:o + 16], "big"), 6)) for o in (8, 24))
            assert not src6.startswith("fd00:10:") and not dst6.startswith("fd00:10:"), f"{src6} -> {dst6} in clear"
            nh, off = f[6], 40
            while nh in (0, 43, 60):  # hop-by-hop (MLD's router alert), routing, destination options
                nh, off = f[off], off + (f[off + 1] + 1) * 8
            if nh == 58 and f[off] in (130, 131, 132, 133, 134, 135, 136, 143):
                continue  # the nodes' own neighbour discovery and MLD, which the kernel sends on its own schedule
            assert nh == 17, f"non-UDP IPv6 packet {src6} -> {dst6} on the underlay"
            sport, dport = struct.unpack(">HH", f[off:off + 4])
            assert {src6, dst6} <= nodes6 and port6 in (sport, dport), f"[{src6}]:{sport} -> [{dst6}]:{dport}"
            udp6 += 1
    assert udp6 >= 10  # the marker datagrams and the IPv6 pings crossed, encrypted, over IPv6
    assert (udp4 > 0) == (mode == "separate")  # Mode ipv6: the IPv4 ping went over IPv6 too
