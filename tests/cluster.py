"""Several simulated nodes on one machine, each running weftd, connected by an underlay.

Topology (every box is a network namespace this module creates):

    [node n1] eth0 ─┐                ┌─ eth0 [node n3]   segment B (192.168.78.0/24), only with two segments
    [node n2] eth0 ─┤ br0  [underlay] br1 ┤
    [etcd]    eth0 ─┤                └─ [router] (192.168.77.1 / 192.168.78.1)
    [kube]    kube0 ┤   kube-apiserver at 192.168.77.3, when tests/kubeapi attaches it
    [outside] eth0 ─┘                    segment A (192.168.77.0/24)

With IPv6 in the underlay (`families`), every interface also gets the same host number in
fd00:77::/64 (segment A) or fd00:78::/64 (segment B); an IPv6-only cluster's underlay has no IPv4.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab import Lab, Netns, Node, file_store, weftd_command, weftd_exe

SEGMENTS = {"A": ("br0", "192.168.77"), "B": ("br1", "192.168.78")}
SEGMENTS6 = {"A": "fd00:77:", "B": "fd00:78:"}
ETCD_IP = "192.168.77.2"
OUTSIDE_IP = "192.168.77.200"
OUTSIDE_IP6 = "fd00:77::200"


@dataclass
class ClusterNode:
    name: str
    node: Node
    ip: str  # "" when the underlay has no IPv4
    segment: str
    proc: subprocess.Popen[bytes] | None = None
    pods: dict[str, tuple[Netns, str]] = field(default_factory=dict)
    ip6: str = ""  # the underlay IPv6 address, when the underlay has IPv6
    pod_ips: dict[str, list[str]] = field(default_factory=dict)  # every address of each pod, IPv4 first

    @property
    def ns(self) -> Netns:
        return self.node.ns

    @property
    def conflist(self) -> Path:
        return self.node.dir / "net.d" / "10-weft.conflist"

    @property
    def subnet_file(self) -> Path:
        return self.node.dir / "run" / "subnet.env"

    @property
    def log(self) -> Path:
        return self.node.dir / "weftd.log"

    @property
    def state_dir(self) -> Path:
        return self.node.dir / "state"

    @property
    def wg_device(self) -> str:
        """wireguard-go's control sockets are shared by every namespace: names unique on the host."""
        return f"wg{self.ns.name[3:9]}{self.name}"[:15]

    def state(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.subnet_file.read_text().split())

    def routes(self, version: int = 4) -> list[dict[str, Any]]:
        return self.ns.ip_json(f"-{version}", "route", "show", "proto", "119")

    def metric(self, name: str) -> float:
        """One unlabelled sample of weftd's /metrics; -1 when weftd does not answer or lacks it."""
        code, body = self.http("/metrics")
        for line in body.splitlines() if code == 200 else []:
            key, _, value = line.partition(" ")
            if key == name:
                return float(value)
        return -1.0

    def http(self, path: str) -> tuple[int, str]:
        code = ("import urllib.request,urllib.error,sys\n"
                f"try: r=urllib.request.urlopen('http://127.0.0.1:9808{path}',timeout=30); print(r.status); "
                "print(r.read().decode())\n"
                "except urllib.error.HTTPError as e: print(e.code); print(e.read().decode())\n")
        p = self.ns.run(sys.executable, "-c", code, check=False)
        if p.returncode != 0 or not p.stdout:
            return 0, p.stderr
        status, _, body = p.stdout.partition("\n")
        return int(status), body


class Cluster:
    def __init__(self, lab: Lab, net_conf: dict[str, Any], store: str = "file", two_segments: bool = False,
                 families: tuple[int, ...] | None = None) -> None:
        self.lab = lab
        self.net_conf = net_conf
        # The pod network's families, and the underlay's (by default the same).
        self.versions = tuple(v for v, key, default in ((4, "EnableIPv4", True), (6, "EnableIPv6", False))
                              if net_conf.get(key, default))
        self.families = families or self.versions
        self.backend = (net_conf.get("Backend") or {}).get("Type", "vxlan")
        self.wireguard = "userspace"  # the path this machine has; tests of the kernel path change it
        self.weftd = weftd_exe()  # or the frozen bundle's weftd
        self.store = store
        self.nodes: dict[str, ClusterNode] = {}
        self.dir = lab.base / "cluster"
        self.dir.mkdir()
        (self.dir / "net-conf.json").write_text(json.dumps(net_conf))
        self.underlay = lab.netns("underlay")
        self._ports = 0
        self.etcd: subprocess.Popen[bytes] | None = None
        self.etcd_ns: Netns | None = None
        self.kubeconfig: Path | None = None  # the kube store: tests/kubeapi writes it
        segments = ["A", "B"] if two_segments else ["A"]
        for seg in segments:
            br = SEGMENTS[seg][0]
            self.underlay.run("ip", "link", "add", br, "type", "bridge")
            self.underlay.run("ip", "link", "set", br, "up")
        if two_segments:
            router = lab.netns("router")
            for seg in segments:
                self.uplink(router, f"eth{seg}", seg, f"{SEGMENTS[seg][1]}.1/24", 1)
            router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            if 6 in self.families:
                router.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.outside = lab.netns("outside")
        self.uplink(self.outside, "eth0", "A", f"{OUTSIDE_IP}/24", 0x200)

    def uplink(self, ns: Netns, ifname: str, segment: str, cidr: str, host6: int | None = None) -> None:
        """A veth from `ns` to the segment's bridge in the underlay namespace; with `host6` and IPv6 in the
        underlay, also the segment's IPv6 address with that host number (hex digits as written)."""
        self._ports += 1
        port = f"p{self._ports}"
        ns.run("ip", "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", self.underlay.name)
        self.underlay.run("ip", "link", "set", port, "master", SEGMENTS[segment][0], "up")
        if 4 in self.families:
            ns.run("ip", "addr", "add", cidr, "dev", ifname)
        if host6 is not None and 6 in self.families:
            ns.run("ip", "addr", "add", f"{SEGMENTS6[segment]}:{host6:x}/64", "dev", ifname, "nodad")
        ns.run("ip", "link", "set", ifname, "up")
        ns.run("ip", "link", "set", "lo", "up")

    def add_node(self, name: str, segment: str = "A") -> ClusterNode:
        node = self.lab.node(name)
        host = 10 + len(self.nodes)
        ip = f"{SEGMENTS[segment][1]}.{host}" if 4 in self.families else ""
        self.uplink(node.ns, "eth0", segment, f"{ip}/24", host)
        if self._has_router():
            if 4 in self.families:
                node.ns.run("ip", "route", "add", "default", "via", f"{SEGMENTS[segment][1]}.1")
            if 6 in self.families:
                node.ns.run("ip", "-6", "route", "add", "default", "via", f"{SEGMENTS6[segment]}:1")
        cn = ClusterNode(name, node, ip, segment, ip6=f"{SEGMENTS6[segment]}:{host:x}" if 6 in self.families else "")
        self.nodes[name] = cn
        return cn

    def _has_router(self) -> bool:
        return any("router" in ns.name for ns in self.lab.namespaces)

    def store_args(self) -> list[str]:
        if self.store == "etcd":
            return ["--store", "etcd", "--etcd-endpoint", f"http://{ETCD_IP}:2379", "--etcd-ttl",
                    str(self.etcd_ttl)]
        if self.store == "kube":
            # As the manifest runs it: NetworkPolicy from the same API server. Without a kubeconfig, weftd uses
            # the credentials a pod has (tests/kubeapi's KubeAPI.as_pod gives them).
            creds = ["--kubeconfig", str(self.kubeconfig)] if self.kubeconfig is not None else []
            return ["--store", "kube", *creds, "--policy-kube"]
        return file_store(self.dir / "store.json")

    etcd_ttl = 30

    def start_etcd(self) -> None:
        if self.etcd_ns is None:
            self.etcd_ns = self.lab.netns("etcd")
            self.uplink(self.etcd_ns, "eth0", "A", f"{ETCD_IP}/24")
        data = self.dir / "etcd-data"
        url = f"http://{ETCD_IP}:2379"
        self.etcd = subprocess.Popen(
            ["ip", "netns", "exec", self.etcd_ns.name, "etcd", "--name", "weft", "--data-dir", str(data),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", "weft=http://127.0.0.1:2380"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "etcd.log", "ab"))
        code = ("import urllib.request,sys\n"
                f"sys.exit(0 if b'true' in urllib.request.urlopen('{url}/health',timeout=1).read() else 1)")
        self.until(lambda: self.etcd_ns is not None and
                   self.etcd_ns.run(sys.executable, "-c", code, check=False).returncode == 0, 60, "etcd healthy")

    def stop_etcd(self) -> None:
        if self.etcd is not None:
            self.etcd.terminate()
            self.etcd.wait(10)
            self.etcd = None

    def start(self, cn: ClusterNode, *extra: str) -> None:
        cmd = weftd_command(cn.ns, self.weftd, cn.name, self.store_args(), self.dir / "net-conf.json", cn.subnet_file,
                            cn.conflist.parent, cn.node.socket, cn.node.data_dir,
                            extra=("--resync", "1", "--log-level", "debug", "--state-dir", str(cn.state_dir),
                                   "--wireguard-device", cn.wg_device, "--wireguard-implementation", self.wireguard,
                                   *extra))
        cn.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(cn.log, "ab"))

    def stop(self, cn: ClusterNode, sig: int = signal.SIGTERM) -> None:
        if cn.proc is not None:
            cn.proc.send_signal(sig)
            cn.proc.wait(60)
            cn.proc = None

    def uninstall(self, cn: ClusterNode) -> None:
        """`weftd uninstall` on the node, with the node's own paths and device names."""
        cn.ns.run(*self.weftd, "uninstall", *self.store_args(), "--subnet-file", str(cn.subnet_file),
                  "--cni-conf-dir", str(cn.conflist.parent), "--ipam-data-dir", str(cn.node.data_dir),
                  "--wireguard-device", cn.wg_device)

    def wait_ready(self, cn: ClusterNode, timeout: float = 120) -> None:
        self.until(lambda: cn.conflist.exists() and cn.http("/healthz")[0] == 200, timeout,
                   f"{cn.name} ready", cn)

    def until(self, cond: Any, timeout: float, what: str, cn: ClusterNode | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        logs = "".join(f"\n--- {n.name} ---\n" + n.log.read_text()[-3000:] for n in self.nodes.values()
                       if n.log.exists() and (cn is None or n is cn))
        raise AssertionError(f"timed out waiting for {what}{logs}")

    def boot(self, names: list[str] | None = None, segments: dict[str, str] | None = None,
             extra: tuple[str, ...] = ()) -> list[ClusterNode]:
        names = names or ["n1", "n2", "n3"]
        out = [self.add_node(n, (segments or {}).get(n, "A")) for n in names]
        for cn in out:
            self.start(cn, *extra)
        for cn in out:
            self.wait_ready(cn)
        for cn in out:
            self.until(lambda cn=cn: self.peers_programmed(cn) == len(out) - 1, 60, f"{cn.name} reaches all peers",
                       cn)
        return out

    def peers_programmed(self, cn: ClusterNode) -> int:
        """Peers the node's kernel reaches: routes, or WireGuard peers (one route covers the network)."""
        if self.backend != "wireguard":
            return min(len(cn.routes(v)) for v in self.versions)
        return len(self.wg_peers(cn))

    def wg_peers(self, cn: ClusterNode) -> dict[str, dict[str, str]]:
        """`wg show <dev> dump` for the node's device, by public key."""
        p = cn.ns.run("wg", "show", cn.wg_device, "dump", check=False)
        out = {}
        for line in p.stdout.splitlines()[1:]:
            key, psk, endpoint, ips, handshake, rx, tx, keepalive = line.split("\t")
            out[key] = {"psk": psk, "endpoint": endpoint, "allowed_ips": ips, "handshake": handshake, "rx": rx,
                        "tx": tx, "keepalive": keepalive}
        return out

    def pod(self, cn: ClusterNode, cid: str) -> tuple[Netns, str]:
        ns = cn.node.pod(cid)
        res = cn.node.drive("add", cn.conflist, cid, ns.path).json
        ips = [a["address"].split("/")[0] for a in res["ips"]]
        ip = ips[0]
        cn.pods[cid] = (ns, ip)
        cn.pod_ips[cid] = ips
        return ns, ip

    def close(self) -> None:
        for cn in self.nodes.values():
            if cn.proc is not None:
                cn.proc.kill()
                cn.proc.wait(10)
        for cn in self.nodes.values():
            self.stop_wireguard_go(cn)
        self.stop_etcd()

    def wireguard_go(self, cn: ClusterNode) -> int | None:
        from weftd.backend.wireguard.userspace import find_daemons

        found = find_daemons(cn.wg_device)
        return found[0][0] if found else None

    def stop_wireguard_go(self, cn: ClusterNode) -> None:
        """It outlives weftd by design; SIGTERM makes it remove its device and its control socket. Also the
        IPv6 device's (Mode separate in a dual-stack cluster)."""
        from weftd.backend.wireguard.userspace import find_daemons

        for dev in (cn.wg_device, f"{cn.wg_device}-v6"):
            for pid, _ in find_daemons(dev):
                os.kill(pid, signal.SIGTERM)
            self.until(lambda dev=dev: not find_daemons(dev), 60, f"wireguard-go {dev} of {cn.name} gone")
            Path(f"/var/run/wireguard/{dev}.sock").unlink(missing_ok=True)


MakeCluster = Callable[..., Cluster]
