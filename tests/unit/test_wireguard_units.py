"""The wireguard backend's pure logic, without root or a kernel module: config, keys, leases, peer
planning, wireguard-go's text protocol (against a socket server in a temp dir) and the generic
netlink messages built for the kernel's device."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
from pathlib import Path

import netaddr
import pytest
from pyroute2.netlink import NLA_F_NESTED
from pyroute2.netlink.generic.wireguard import WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS, wgmsg

from weftd.backend.wireguard import plan_tunnels
from weftd.backend.wireguard.kernel import PEERS_PER_MESSAGE, get_message, parse_device, set_messages
from weftd.backend.wireguard.keys import KeyFileError, KeyPair, load_or_create, public_key
from weftd.backend.wireguard.peers import (
    ZERO_KEY,
    LeaseData,
    PeerConfig,
    PeerState,
    RemovePeer,
    SetPeer,
    desired_peers,
    endpoint,
    endpoint_version,
    plan,
)
from weftd.backend.wireguard.uapi import Uapi, UapiError, parse_get, set_lines
from weftd.config import ConfigError, NetworkConfig
from weftd.lease import Attrs, Lease

# RFC 7748 section 6.1: Alice's X25519 key pair.
ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def key(n: int) -> str:
    return b64(bytes([n]) * 32)


def net(**backend: object) -> NetworkConfig:
    return NetworkConfig.parse({"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", **backend}})


# --- config -------------------------------------------------------------------------------------

def test_config_defaults_are_flannels() -> None:
    wg = net().backend
    assert wg is not None
    assert (wg.psk, wg.listen_port, wg.listen_port_v6, wg.keepalive, wg.mode) == (None, 51820, 51821, 0, "separate")


def test_config_round_trips_through_the_store() -> None:
    cfg = net(PSK=key(9), ListenPort=5000, listenportv6=5001, PersistentKeepaliveInterval=25, Mode="Auto", MTU=9000)
    again = NetworkConfig.parse(cfg.to_json())
    assert again == cfg
    wg = again.backend
    assert wg is not None and (wg.psk, wg.listen_port, wg.keepalive, wg.mode, again.backend.mtu) == (
        key(9), 5000, 25, "auto", 9000)
    assert key(9) not in repr(wg)  # the PSK stays out of reprs and so out of logs


@pytest.mark.parametrize("backend,words", [
    ({"PSK": "c2hvcnQ="}, "PSK must be a WireGuard key"),
    ({"PSK": 7}, "PSK must be a WireGuard key"),
    ({"ListenPort": 70000}, "ListenPort 70000 must be a UDP port"),
    ({"ListenPort": "51820"}, "ListenPort '51820' must be a UDP port"),
    ({"ListenPortV6": -1}, "ListenPortV6 -1 must be a UDP port"),
    ({"PersistentKeepaliveInterval": -5}, "PersistentKeepaliveInterval -5"),
    ({"PersistentKeepaliveInterval": True}, "PersistentKeepaliveInterval True"),
    ({"Mode": "both"}, "Mode 'both' must be one of separate, auto, ipv4, ipv6"),
    ({"ListenPort": 6000, "ListenPortV6": 6000}, "Mode separate needs two ports"),
    ({"MTU": 100}, "Backend.MTU 100"),
])
def test_config_rejects(backend: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        net(**backend)
    assert words in str(e.value)


def test_one_port_is_fine_when_one_device_carries_both_families() -> None:
    wg = net(ListenPort=6000, ListenPortV6=6000, Mode="auto").backend
    assert wg is not None and wg.listen_port == 6000


# --- keys ---------------------------------------------------------------------------------------

def test_public_key_is_x25519_as_wg_pubkey_computes_it() -> None:
    assert KeyPair.from_private(ALICE_PRIV).public == ALICE_PUB
    assert public_key(b64(ALICE_PRIV)) == b64(ALICE_PUB)


def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "wireguard.key"
    old = os.umask(0o022)  # the file's mode must not depend on the umask
    try:
        pair, created = load_or_create(path)
    finally:
        os.umask(old)
    assert created and path.stat().st_mode & 0o777 == 0o600
    assert base64.b64decode(path.read_text().strip()) == pair.private
    again, created = load_or_create(path)
    assert not created and again == pair
    assert [p.name for p in path.parent.iterdir()] == ["wireguard.key"]  # no temp file left


def test_key_file_with_loose_mode_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "wireguard.key"
    path.write_text(b64(ALICE_PRIV) + "\n")
    path.chmod(0o644)
    pair, created = load_or_create(path)
    assert not created and pair.public == ALICE_PUB and path.stat().st_mode & 0o777 == 0o600


def test_unusable_key_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "wireguard.key"
    path.write_text("-----BEGIN PRIVATE KEY----- secretstuff\n")
    with pytest.raises(KeyFileError) as e:
        load_or_create(path)
    assert "does not hold a WireGuard private key" in str(e.value) and "secretstuff" not in str(e.value)


# --- leases -------------------------------------------------------------------------------------

def wg_attrs(ip: netaddr.IPAddress | None, pub: str, port: int | None = None, ip6: netaddr.IPAddress | None = None,
             port6: int | None = None) -> Attrs:
    """What the wireguard backend publishes (WireGuard.attrs)."""
    data = LeaseData(pub, port, port6)
    return Attrs(ip, "wireguard", data.to_json(4), ip6, data.to_json(6))


def test_lease_carries_public_key_and_port() -> None:
    attrs = wg_attrs(netaddr.IPAddress("192.0.2.1"), key(1), 51820)
    lease = Lease("n1", netaddr.IPNetwork("10.244.1.0/24"), attrs)
    assert lease.to_json()["BackendData"] == {"PublicKey": key(1), "Port": 51820}
    assert Lease.from_json(lease.to_json()) == lease
    assert LeaseData.of(lease.attrs) == LeaseData(key(1), 51820, None)
    flannel = {"PublicIP": "192.0.2.1", "Subnet": "10.244.1.0/24", "BackendType": "wireguard",
               "BackendData": {"PublicKey": key(1), "Port": 0}}  # Port 0: "my own listen port"
    data = LeaseData.of(Lease.from_json(flannel).attrs)
    assert data is not None and data.port is None


@pytest.mark.parametrize("data", [{"PublicKey": "bm90IGEga2V5"}, {"PublicKey": "%%%"}, {"PublicKey": 7},
                                  {"PublicKey": key(1), "Port": 70000}, {"PublicKey": key(1), "Port": "x"}])
def test_a_peer_with_bad_wireguard_data_is_refused(data: dict[str, object]) -> None:
    peer = Lease.from_json({"Node": "n2", "PublicIP": "192.0.2.2", "Subnet": "10.244.2.0/24",
                            "BackendType": "wireguard", "BackendData": data})
    with pytest.raises(ValueError):
        LeaseData.of(peer.attrs)
    d = desired_peers(lease("n1", 1, key(1)), key(1), [peer], 51820, 0, None)
    assert d.peers == {} and "publishes unreadable WireGuard data" in d.refused["n2"]


def test_kube_store_publishes_the_key_in_the_node_annotation() -> None:
    from weftd.subnet.kube import ANN_DATA, lease_from_node, node_annotations

    ann = node_annotations(wg_attrs(netaddr.IPAddress("192.0.2.1"), key(1), 51820))
    assert json.loads(ann[ANN_DATA]) == {"PublicKey": key(1), "Port": 51820}
    node = {"metadata": {"name": "n1", "annotations": ann}, "spec": {"podCIDR": "10.244.1.0/24"}}
    got = lease_from_node(node, net())
    assert got is not None and LeaseData.of(got.attrs) == LeaseData(key(1), 51820, None)


# --- peers --------------------------------------------------------------------------------------

def lease(node: str, n: int, pub: str | None, backend: str = "wireguard", port: int | None = None) -> Lease:
    ip = netaddr.IPAddress(f"192.0.2.{n}")
    return Lease(node, netaddr.IPNetwork(f"10.244.{n}.0/24"),
                 wg_attrs(ip, pub, port) if pub is not None else Attrs(ip, backend))


def test_desired_peers_one_per_node() -> None:
    own = lease("n1", 1, key(1))
    d = desired_peers(own, key(1), [lease("n2", 2, key(2)), lease("n3", 3, key(3), port=6000)], 51820, 25, key(9))
    assert d.peers[key(2)] == PeerConfig(key(2), "192.0.2.2:51820", ("10.244.2.0/24",), 25, key(9))
    assert d.peers[key(3)].endpoint == "192.0.2.3:6000"
    assert d.nodes == {key(2): "n2", key(3): "n3"} and d.refused == {}


def test_nodes_behind_one_nat_share_an_endpoint_and_both_stay() -> None:
    own = lease("n1", 1, key(1))
    a, b = lease("a", 2, key(2)), lease("b", 3, key(3))
    b = Lease(b.node, b.subnet, wg_attrs(a.public_ip, key(3), 51821))
    d = desired_peers(own, key(1), [a, b], 51820, 0, None)
    assert set(d.peers) == {key(2), key(3)}


def test_a_key_claimed_twice_is_programmed_for_neither() -> None:
    own = lease("n1", 1, key(1))
    d = desired_peers(own, key(1), [lease("n2", 2, key(2)), lease("n3", 3, key(2)), lease("n4", 4, key(4))],
                      51820, 0, None)
    assert set(d.peers) == {key(4)}
    assert "also claimed by n3" in d.refused["n2"] and "also claimed by n2" in d.refused["n3"]


def test_a_peer_with_our_own_key_is_refused() -> None:
    d = desired_peers(lease("n1", 1, key(1)), key(1), [lease("n2", 2, key(1))], 51820, 0, None)
    assert d.peers == {} and "also claimed by n1" in d.refused["n2"]


def test_a_node_of_another_backend_is_refused() -> None:
    d = desired_peers(lease("n1", 1, key(1)), key(1), [lease("n2", 2, None, "vxlan")], 51820, 0, None)
    assert d.peers == {} and "publishes no WireGuard public key (backend vxlan)" in d.refused["n2"]


def dual(node: str, n: int, pub: str, v4: str | None = None, v6: str | None = None, ports: tuple[int, int] = (0, 0),
         families: tuple[int, ...] = (4, 6)) -> Lease:
    return Lease(node, netaddr.IPNetwork(f"10.244.{n}.0/24") if 4 in families else None,
                 wg_attrs(netaddr.IPAddress(v4 or f"192.0.2.{n}") if v4 != "" else None, pub, ports[0] or None,
                          netaddr.IPAddress(v6 or f"fd00:77::{n}") if v6 != "" else None, ports[1] or None),
                 netaddr.IPNetwork(f"fd00:10:0:{n}::/64") if 6 in families else None)


def test_separate_mode_one_device_per_family_each_over_its_own_family() -> None:
    cfg = net(Mode="separate").backend
    assert plan_tunnels(cfg, (4, 6)) == [(51820, (4,), "ipv4"), (51821, (6,), "ipv6")]  # type: ignore[arg-type]
    assert plan_tunnels(cfg, (6,)) == [(51821, (6,), "ipv6")]  # type: ignore[arg-type]
    own, peer = dual("n1", 1, key(1)), dual("n2", 2, key(2), ports=(51820, 51821))
    d4 = desired_peers(own, key(1), [peer], 51820, 0, None, versions=(4,), mode="ipv4")
    d6 = desired_peers(own, key(1), [peer], 51821, 0, None, versions=(6,), mode="ipv6")
    assert d4.peers[key(2)] == PeerConfig(key(2), "192.0.2.2:51820", ("10.244.2.0/24",))
    assert d6.peers[key(2)] == PeerConfig(key(2), "[fd00:77::2]:51821", ("fd00:10:0:2::/64",))
    # a node without an IPv6 address cannot be reached by the IPv6 device; it says why
    d6 = desired_peers(own, key(1), [dual("n3", 3, key(3), v6="")], 51821, 0, None, versions=(6,), mode="ipv6")
    assert d6.peers == {} and "publishes no IPv6 address" in d6.refused["n3"]


def test_one_device_modes_carry_both_families_to_the_endpoint_the_mode_picks() -> None:
    for mode in ("auto", "ipv4", "ipv6"):
        assert plan_tunnels(net(Mode=mode).backend, (4, 6)) == [(51820, (4, 6), mode)]  # type: ignore[arg-type]
    own, peer = dual("n1", 1, key(1)), dual("n2", 2, key(2), ports=(51820, 51820))
    for mode, ep in (("ipv4", "192.0.2.2:51820"), ("ipv6", "[fd00:77::2]:51820"), ("auto", "192.0.2.2:51820")):
        d = desired_peers(own, key(1), [peer], 51820, 0, None, versions=(4, 6), mode=mode)
        assert d.peers[key(2)] == PeerConfig(key(2), ep, ("10.244.2.0/24", "fd00:10:0:2::/64"))


def test_auto_picks_endpoints_like_flannel() -> None:
    own = dual("n1", 1, key(1), v4="10.0.0.1", v6="2a00:1::1")
    assert endpoint_version("auto", own, dual("a", 2, key(2), v4="", v6="fd00::2")) == 6  # the only one
    assert endpoint_version("auto", own, dual("b", 3, key(3), v4="10.0.0.3", v6="")) == 4
    assert endpoint_version("auto", own, dual("c", 4, key(4), v4="1.2.3.4", v6="2a00:4::4")) == 4  # public v4
    assert endpoint_version("auto", own, dual("d", 5, key(5), v4="10.0.0.5", v6="2a00:5::5")) == 6  # public v6s
    private6 = dual("n1", 1, key(1), v4="10.0.0.1", v6="fd00::1")
    assert endpoint_version("auto", private6, dual("e", 6, key(6), v4="10.0.0.6", v6="2a00:6::6")) == 4
    assert endpoint_version("ipv6", own, dual("f", 7, key(7), v6="")) is None


def test_plan_removes_stale_first_and_fixes_drift_only() -> None:
    good = PeerConfig(key(2), "192.0.2.2:51820", ("10.244.2.0/24",))
    moved = PeerConfig(key(3), "192.0.2.3:51820", ("10.244.3.0/24",))
    actual = {key(2): PeerState(good, 1.0), key(3): PeerState(PeerConfig(key(3), "198.51.100.3:51820",
                                                                         ("10.244.3.0/24",))),
              key(7): PeerState(PeerConfig(key(7), None, ("10.244.3.0/24",)))}
    ops = plan({key(2): good, key(3): moved}, actual)
    assert ops == [RemovePeer(key(7)), SetPeer(moved)]
    assert plan({key(2): good}, {key(2): PeerState(good, 5.0, 10, 10)}) == []


def test_endpoint_formats() -> None:
    assert endpoint(netaddr.IPAddress("192.0.2.1"), 1) == "192.0.2.1:1"
    assert endpoint(netaddr.IPAddress("2001:db8::1"), 2) == "[2001:db8::1]:2"


# --- wireguard-go's text protocol ---------------------------------------------------------------

GET_ANSWER = f"""private_key={"05" * 32}
listen_port=51820
public_key={"02" * 32}
preshared_key={"00" * 32}
protocol_version=1
endpoint=192.0.2.2:51820
last_handshake_time_sec=1700000000
last_handshake_time_nsec=500000000
tx_bytes=10
rx_bytes=20
persistent_keepalive_interval=25
allowed_ip=10.244.2.0/24
public_key={"03" * 32}
preshared_key={"09" * 32}
protocol_version=1
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
allowed_ip=10.244.3.128/25
allowed_ip=10.244.3.0/25
"""


def test_parse_get() -> None:
    st = parse_get(GET_ANSWER)
    assert st.private_key == key(5) and st.listen_port == 51820
    p2, p3 = st.peers[key(2)], st.peers[key(3)]
    assert p2.config == PeerConfig(key(2), "192.0.2.2:51820", ("10.244.2.0/24",), 25, None)
    assert (p2.last_handshake, p2.rx_bytes, p2.tx_bytes) == (1700000000.5, 20, 10)
    assert p3.config == PeerConfig(key(3), None, ("10.244.3.0/25", "10.244.3.128/25"), 0, key(9))


def test_set_lines() -> None:
    peer = PeerConfig(key(2), "192.0.2.2:51820", ("10.244.2.0/24",), 25, None)
    assert set_lines(key(5), 51820, [RemovePeer(key(3)), SetPeer(peer)]) == [
        f"private_key={'05' * 32}", "listen_port=51820", f"public_key={'03' * 32}", "remove=true",
        f"public_key={'02' * 32}", f"preshared_key={'00' * 32}", "endpoint=192.0.2.2:51820",
        "persistent_keepalive_interval=25", "replace_allowed_ips=true", "allowed_ip=10.244.2.0/24"]
    assert set_lines() == []


class FakeWireGuardGo:
    """Serves the UAPI on a unix socket the way wireguard-go does: one request per connection."""

    def __init__(self, path: Path, answers: dict[str, str]) -> None:
        self.requests: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.answers = answers
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\n\n"):
                    buf += conn.recv(4096)
                req = buf.decode()
                self.requests.append(req)
                conn.sendall(self.answers[req.split("\n", 1)[0]].encode())


def test_uapi_client_against_a_socket(tmp_path: Path) -> None:
    srv = FakeWireGuardGo(tmp_path / "wg-test.sock", {"get=1": GET_ANSWER + "errno=0\n\n", "set=1": "errno=0\n\n"})
    u = Uapi("wg-test", tmp_path)
    assert u.alive() and u.get().listen_port == 51820
    u.set(listen_port=6000, ops=[RemovePeer(key(3))])
    assert srv.requests[-1] == f"set=1\nlisten_port=6000\npublic_key={'03' * 32}\nremove=true\n\n"
    srv.answers["set=1"] = "errno=-22\n\n"
    with pytest.raises(UapiError) as e:
        u.set(listen_port=1)
    assert "errno=-22" in str(e.value)
    srv.sock.close()
    assert not Uapi("absent", tmp_path).alive()


# --- the kernel's generic netlink messages ------------------------------------------------------

def decoded(msg: wgmsg) -> wgmsg:
    msg["header"]["type"] = 0x1F  # the family id the kernel would have given "wireguard"
    msg.encode()
    out = wgmsg(msg.data)
    out.decode()
    return out


def test_set_device_message() -> None:
    peer = PeerConfig(key(2), "192.0.2.2:51820", ("10.244.2.0/24",), 25, key(9))
    (msg,) = set_messages("weft-wg", key(5), 51820, [RemovePeer(key(3)), SetPeer(peer)])
    m = decoded(msg)
    assert (m["cmd"], m["version"]) == (1, 1)  # WG_CMD_SET_DEVICE, WG_GENL_VERSION
    assert m.get_attr("WGDEVICE_A_IFNAME") == "weft-wg"
    assert base64.b64decode(m.get_attr("WGDEVICE_A_PRIVATE_KEY")) == bytes([5]) * 32
    assert m.get_attr("WGDEVICE_A_LISTEN_PORT") == 51820
    gone, added = m.get_attr("WGDEVICE_A_PEERS")
    assert gone.get_attr("WGPEER_A_PUBLIC_KEY").decode() == key(3)
    assert gone.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert gone.get_attr("WGPEER_A_ENDPOINT") is None
    assert added.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert added.get_attr("WGPEER_A_PRESHARED_KEY").decode() == key(9)
    assert added.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    ep = added.get_attr("WGPEER_A_ENDPOINT")
    assert (ep["family"], ep["addr"], ep["port"]) == (socket.AF_INET, "192.0.2.2", 51820)
    (ip,) = added.get_attr("WGPEER_A_ALLOWEDIPS")
    assert (ip.get_attr("WGALLOWEDIP_A_FAMILY"), ip["addr"], ip.get_attr("WGALLOWEDIP_A_CIDR_MASK")) == (
        socket.AF_INET, "10.244.2.0/24", 24)


def test_set_message_wire_layout() -> None:
    """The kernel parses WGDEVICE_A_PEERS as a nest of peer nests, each with a nest of allowed IPs,
    and the endpoint as a struct sockaddr_in; check the bytes, not only pyroute2's own decoding."""
    (msg,) = set_messages("wg0", None, None, [SetPeer(PeerConfig(key(2), "192.0.2.2:51820", ("10.244.2.0/24",)))])
    msg["header"]["type"] = 0x1F
    msg.encode()
    data = bytes(msg.data)

    def attrs(buf: bytes) -> list[tuple[int, bool, bytes]]:
        out, off = [], 0
        while off + 4 <= len(buf):
            length, kind = struct.unpack("=HH", buf[off:off + 4])
            out.append((kind & ~NLA_F_NESTED, bool(kind & NLA_F_NESTED), buf[off + 4:off + length]))
            off += (length + 3) & ~3
        return out

    top = dict((k, (nested, v)) for k, nested, v in attrs(data[20:]))  # 16 nlmsghdr + 4 genlmsghdr
    assert top[2][1] == b"wg0\0" and 3 not in top and 6 not in top  # no key, no port: untouched
    nested, peers = top[8]  # WGDEVICE_A_PEERS
    assert nested
    (peer,) = attrs(peers)
    assert peer[1]
    fields = {k: v for k, _, v in attrs(peer[2])}
    assert fields[1] == bytes([2]) * 32  # WGPEER_A_PUBLIC_KEY, raw
    assert fields[4][:8] == struct.pack("=H", socket.AF_INET) + struct.pack(">H", 51820) + bytes([192, 0, 2, 2])
    assert len(fields[4]) == 16  # sizeof(struct sockaddr_in)
    (allowed,) = attrs(fields[9])  # WGPEER_A_ALLOWEDIPS
    inner = {k: v for k, _, v in attrs(allowed[2])}
    assert inner == {1: struct.pack("=H", socket.AF_INET), 2: bytes([10, 244, 2, 0]), 3: bytes([24])}


def test_many_peers_are_split_over_messages() -> None:
    ops = [SetPeer(PeerConfig(b64(i.to_bytes(2, "big") * 16), f"192.0.2.{i}:51820", (f"10.244.{i}.0/24",)))
           for i in range(1, 41)]
    msgs = set_messages("weft-wg", key(5), 51820, ops)
    assert len(msgs) == 3 and len(msgs[0].get_attr("WGDEVICE_A_PEERS")) == PEERS_PER_MESSAGE
    assert [m.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None for m in msgs] == [True, False, False]
    assert set_messages("weft-wg") == []


def test_parse_device_answer_spread_over_messages() -> None:
    """A dump answer as the kernel sends it: a peer's allowed IPs may go on in the next message."""
    def answer(first: bool, peers: list[dict[str, object]]) -> wgmsg:
        m = wgmsg()
        m["cmd"], m["version"] = 0, 1
        m["attrs"].append(["WGDEVICE_A_IFNAME", "weft-wg"])
        if first:
            m["attrs"] += [["WGDEVICE_A_PRIVATE_KEY", key(5)], ["WGDEVICE_A_LISTEN_PORT", 51820]]
        m["attrs"].append(["WGDEVICE_A_PEERS", peers])
        return decoded(m)

    def allowed(cidr: str) -> dict[str, object]:
        a, p = cidr.split("/")
        return {"attrs": [["WGALLOWEDIP_A_FAMILY", socket.AF_INET],
                          ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(socket.AF_INET, a)],
                          ["WGALLOWEDIP_A_CIDR_MASK", int(p)]]}

    p2 = {"attrs": [["WGPEER_A_PUBLIC_KEY", key(2)], ["WGPEER_A_PRESHARED_KEY", ZERO_KEY],
                    ["WGPEER_A_ENDPOINT", {"addr": "192.0.2.2", "port": 51820}],
                    ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                    ["WGPEER_A_ALLOWEDIPS", [allowed("10.244.2.0/25")]]]}
    p2_more = {"attrs": [["WGPEER_A_PUBLIC_KEY", key(2)], ["WGPEER_A_ALLOWEDIPS", [allowed("10.244.2.128/25")]]]}
    st = parse_device([answer(True, [p2]), answer(False, [p2_more])])
    assert st.private_key == key(5) and st.listen_port == 51820
    assert st.peers[key(2)].config == PeerConfig(key(2), "192.0.2.2:51820", ("10.244.2.0/25", "10.244.2.128/25"),
                                                 25, None)
    assert plan({key(2): st.peers[key(2)].config}, st.peers) == []


def test_get_message() -> None:
    m = decoded(get_message("weft-wg"))
    assert (m["cmd"], m.get_attr("WGDEVICE_A_IFNAME")) == (0, "weft-wg")
