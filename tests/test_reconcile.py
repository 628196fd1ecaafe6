"""The batched reconcile on the real kernel: one dump per kind, only the differences sent.

The backends run in-process, inside a namespace of the lab (the test thread enters it). Hundreds of
peers appear, some leave while others join, Weft's own entries drift and foreign entries sit beside
them: afterwards the kernel holds exactly the desired entries, the foreign ones are untouched, and a
second round changes nothing.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import netaddr
import pytest

from tests.lab import Lab, Netns
from weftd.backend import parse_config
from weftd.backend.hostgw import HostGW
from weftd.backend.sync import PROTO, RouteSpec, Stats, sync_fdb, sync_neighbours, sync_routes
from weftd.backend.underlay import find_underlay
from weftd.backend.vxlan import VXLAN, VtepData, VXLANConfig
from weftd.lease import Attrs, Lease
from weftlib.kernel.netns import NetNS

UNDERLAY = "192.168.200.254/16"  # peers' 192.168.100.x addresses are on-link


def peer(i: int) -> Lease:
    mac = f"02:00:00:{(i >> 8) & 255:02x}:{i & 255:02x}:01"
    return Lease(f"peer{i}", netaddr.IPNetwork(f"10.{i >> 8}.{i & 255}.0/24"),
                 Attrs(netaddr.IPAddress(f"192.168.100.{i % 250 + 1}") + (i // 250) * 256, "vxlan",
                       VtepData(1, mac).to_json()))


def vtep_mac(p: Lease) -> str:
    return p.attrs.backend_data["VtepMAC"]


OWN = Lease("me", netaddr.IPNetwork("10.250.1.0/24"), Attrs(netaddr.IPAddress("192.168.200.254"), "vxlan"))


@pytest.fixture
def node_ns(lab: Lab) -> Netns:
    ns = lab.netns("node")
    ns.run("ip", "link", "set", "lo", "up")
    ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    ns.run("ip", "addr", "add", UNDERLAY, "dev", "eth0")
    ns.run("ip", "link", "set", "eth0", "up")
    ns.run("ip", "link", "set", "eth0p", "up")
    ns.run("ip", "-6", "addr", "add", "fd00:200::254/64", "dev", "eth0", "nodad")
    return ns


@contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """This thread in `ns`: the backends' sockets open there."""
    with NetNS(ns.path) as handle, handle.entered():
        yield


def weft_routes(ns: Netns, family: str = "-4") -> dict[str, dict[str, Any]]:
    return {r["dst"]: r for r in ns.ip_json(family, "route", "show", "proto", str(PROTO))}


def neighbours(ns: Netns, dev: str, family: str = "-4") -> dict[str, str]:
    return {n["dst"]: n["lladdr"] for n in ns.ip_json(family, "neigh", "show", "dev", dev) if "lladdr" in n}


def fdb(ns: Netns, dev: str) -> dict[str, list[str]]:
    """The device's FDB entries with a remote, MAC: remotes."""
    out: dict[str, list[str]] = {}
    for e in json.loads(ns.run("bridge", "-j", "fdb", "show", "dev", dev).stdout or "[]"):
        if "dst" in e:
            out.setdefault(e["mac"], []).append(e["dst"])
    return out


def vxlan_backend(ns: Netns) -> VXLAN:
    from pyroute2 import IPRoute

    ipr = IPRoute()
    cfg = parse_config({"Type": "vxlan"})
    assert isinstance(cfg, VXLANConfig)
    b = VXLAN(ipr, cfg, find_underlay(ipr, "eth0"))
    b.setup(OWN)
    return b


def assert_vxlan_matches(ns: Netns, peers: list[Lease]) -> None:
    routes = weft_routes(ns)
    assert set(routes) == {str(p.subnet) for p in peers}
    for p in peers:
        r = routes[str(p.subnet)]
        assert (r["gateway"], r["dev"], "onlink" in r.get("flags", [])) == (str(p.subnet.network), "weft.1", True)
    assert neighbours(ns, "weft.1") == {str(p.subnet.network): vtep_mac(p) for p in peers}
    assert fdb(ns, "weft.1") == {vtep_mac(p): [str(p.public_ip)] for p in peers}


def test_vxlan_peers_join_leave_and_drift_is_repaired_foreign_untouched(node_ns: Netns) -> None:
    ns = node_ns
    peers = [peer(i) for i in range(300)]
    with inside(ns):
        b = vxlan_backend(ns)
        stats = b.reconcile(OWN, peers)
    assert (stats.routes, stats.neighbours, stats.fdb, stats.changes) == (300, 300, 300, 900)
    assert_vxlan_matches(ns, peers)

    # Foreign entries: another protocol's route, a route in another table, a neighbour on the underlay.
    ns.run("ip", "route", "add", "10.99.0.0/24", "via", "192.168.100.9", "proto", "static")
    ns.run("ip", "route", "add", "10.98.0.0/24", "via", "192.168.100.9", "proto", str(PROTO), "table", "100")
    ns.run("ip", "neigh", "add", "192.168.100.77", "lladdr", "02:aa:00:00:00:01", "dev", "eth0", "nud", "permanent")
    # Weft's own entries drift: a wrong gateway, a lost neighbour, a wrong MAC, a wrong FDB remote,
    # a second FDB remote, and a stale route nobody wants any more.
    ns.run("ip", "route", "replace", "10.0.5.0/24", "via", "192.168.100.200", "dev", "eth0", "proto", str(PROTO))
    ns.run("ip", "neigh", "del", "10.0.6.0", "dev", "weft.1")
    ns.run("ip", "neigh", "replace", "10.0.7.0", "lladdr", "02:bb:00:00:00:07", "dev", "weft.1", "nud", "permanent")
    ns.run("bridge", "fdb", "replace", vtep_mac(peers[8]), "dev", "weft.1", "dst", "192.168.100.222", "self",
           "permanent")
    ns.run("bridge", "fdb", "append", vtep_mac(peers[9]), "dev", "weft.1", "dst", "192.168.100.223", "self",
           "permanent")
    ns.run("ip", "route", "add", "10.97.0.0/24", "via", "192.168.100.9", "proto", str(PROTO))

    # 100 leave, 100 join, at once.
    now = peers[100:] + [peer(i) for i in range(300, 400)]
    with inside(ns):
        stats = b.reconcile(OWN, now)
        assert stats.changes > 0
        again = b.reconcile(OWN, now)
    assert again.changes == 0, "a converged kernel needs no change"
    assert_vxlan_matches(ns, now)
    assert "10.99.0.0/24" in {r["dst"] for r in ns.ip_json("route", "show", "proto", "static")}
    assert [r["dst"] for r in ns.ip_json("route", "show", "table", "100")] == ["10.98.0.0/24"]
    assert neighbours(ns, "eth0").get("192.168.100.77") == "02:aa:00:00:00:01"

    with inside(ns):
        gone = b.reconcile(OWN, [])
    assert gone.changes == 3 * len(now)
    assert (weft_routes(ns), neighbours(ns, "weft.1"), fdb(ns, "weft.1")) == ({}, {}, {})
    assert "10.99.0.0/24" in {r["dst"] for r in ns.ip_json("route", "show", "proto", "static")}


def test_host_gw_batched_on_link_check(node_ns: Netns) -> None:
    from pyroute2 import IPRoute

    ns = node_ns
    ns.run("ip", "route", "add", "172.16.0.0/16", "via", "192.168.100.1")  # beyond a router: not on-link
    near = [peer(i) for i in range(200)]
    far = [Lease(f"far{i}", netaddr.IPNetwork(f"10.200.{i}.0/24"), Attrs(netaddr.IPAddress(f"172.16.0.{i + 1}"),
                                                                       "host-gw")) for i in range(20)]
    nowhere = Lease("nowhere", netaddr.IPNetwork("10.201.0.0/24"), Attrs(netaddr.IPAddress("203.0.113.1"), "host-gw"))
    with inside(ns):
        ipr = IPRoute()
        b = HostGW(ipr, parse_config({"Type": "host-gw"}), find_underlay(ipr, "eth0"))
        stats = b.reconcile(OWN, near + far + [nowhere])
        again = b.reconcile(OWN, near + far + [nowhere])
    assert sorted(stats.unreachable) == sorted([p.node for p in far] + ["nowhere"])
    assert again.changes == 0
    routes = weft_routes(ns)
    assert {dst: (r["gateway"], r["dev"]) for dst, r in routes.items()} == {
        str(p.subnet): (str(p.public_ip), "eth0") for p in near}


def test_either_family_in_one_reconcile(node_ns: Netns) -> None:
    """The mechanism is family-agnostic: IPv6 routes, neighbours and FDB remotes go the same way."""
    ns = node_ns
    ns.run("ip", "link", "add", "wv6", "type", "vxlan", "id", "7", "local", "fd00:200::254", "dstport", "4790",
           "nolearning")
    ns.run("ip", "link", "set", "wv6", "up")
    ns.run("ip", "-6", "route", "add", "fd00:99::/64", "via", "fd00:200::9", "proto", "static")
    with inside(ns):
        eth0_index, wv6 = socket.if_nametoindex("eth0"), socket.if_nametoindex("wv6")
        routes = {netaddr.IPNetwork(f"fd00:1:{i:x}::/64"):
                  RouteSpec(netaddr.IPAddress(f"fd00:200::{i + 1:x}"), eth0_index) for i in range(50)}
        routes[netaddr.IPNetwork("10.77.0.0/24")] = RouteSpec(netaddr.IPAddress("192.168.100.7"), eth0_index)
        routes.update({netaddr.IPNetwork(f"fd00:2:{i:x}::/64"):
                       RouteSpec(netaddr.IPAddress(f"fd00:2:{i:x}::"), wv6, onlink=True) for i in range(50)})
        neigh = {netaddr.IPAddress(f"fd00:2:{i:x}::"): f"02:00:00:00:{i:02x}:06" for i in range(50)}
        remotes = {f"02:00:00:00:{i:02x}:06": netaddr.IPAddress(f"fd00:200::{i + 100:x}") for i in range(50)}
        stats = Stats()
        sync_neighbours(wv6, neigh, (socket.AF_INET6,), stats)
        sync_fdb(wv6, remotes, stats)
        sync_routes(routes, stats)
        assert stats.changes == 201
        # Half the IPv6 peers leave.
        keep = {k: v for k, v in routes.items() if not str(k).startswith("fd00:1:") or k.network.words[2] < 25}
        again = Stats()
        sync_routes(keep, again)
        sync_routes(keep, settled := Stats())
    assert again.changes == 25 and settled.changes == 0
    v6 = weft_routes(ns, "-6")
    assert set(v6) == {str(k) for k in keep if k.version == 6}
    assert v6["fd00:2:3::/64"]["dev"] == "wv6" and "onlink" in v6["fd00:2:3::/64"].get("flags", [])
    assert set(weft_routes(ns)) == {"10.77.0.0/24"}
    assert neighbours(ns, "wv6", "-6") == {str(ip): mac for ip, mac in neigh.items()}
    assert fdb(ns, "wv6") == {mac: [str(ip)] for mac, ip in remotes.items()}
    assert "fd00:99::/64" in {r["dst"] for r in ns.ip_json("-6", "route", "show", "proto", "static")}


def test_underlay_prefers_an_ipv6_address_that_finished_dad(node_ns: Netns) -> None:
    """The kernel lists its newest IPv6 address first; one still in duplicate address detection (it may
    yet fail) is passed over for one that finished, and is picked only when there is no other."""
    from pyroute2 import IPRoute

    node_ns.run("sysctl", "-qw", "net.ipv6.conf.eth0.dad_transmits=30")  # DAD lasts 30 s: it is still on below
    node_ns.run("ip", "-6", "addr", "add", "fd00:200::1/64", "dev", "eth0")
    listed = [(a["local"], a.get("tentative", False))
              for link in node_ns.ip_json("-6", "addr", "show", "dev", "eth0", "scope", "global")
              for a in link["addr_info"] if "local" in a]  # iproute2 prints {} for each address it filters out
    assert listed == [("fd00:200::1", True), ("fd00:200::254", False)]
    with inside(node_ns):
        ipr = IPRoute()
        try:
            assert str(find_underlay(ipr, "eth0", versions=(4, 6)).ip6) == "fd00:200::254"
            node_ns.run("ip", "-6", "addr", "del", "fd00:200::254/64", "dev", "eth0")
            assert str(find_underlay(ipr, "eth0", versions=(4, 6)).ip6) == "fd00:200::1"
        finally:
            ipr.close()
