"""What the device should hold, what it holds, and the changes between them. Pure logic.

Peers are derived from leases, one per node. A peer is identified on the device by its public
key, but Weft decides by node name: a node's key can change (rotation) and several nodes can
share one endpoint address (behind one NAT; Flannel's endpoint-based cleanup broke those, flannel
PR #2073), so nothing is ever removed because of its endpoint. A public key claimed by two nodes
is programmed for neither, as Calico does: which of them holds the private key cannot be told.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import netaddr

from weftd.lease import Attrs, Lease

ZERO_KEY = "A" * 43 + "="  # base64 of 32 zero bytes: "no key" in both the kernel's and wireguard-go's answers


def endpoint(ip: netaddr.IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True)
class LeaseData:
    """What a node publishes with its lease for the wireguard backend (Flannel's wireguard lease data): its
    public key, one for both families, and per family the port its device listens on."""

    public_key: str  # base64
    port: int | None  # for IPv4; None: the same as this node's
    port6: int | None

    def to_json(self, version: int) -> dict[str, Any]:
        return {"PublicKey": self.public_key, "Port": self.port if version == 4 else self.port6}

    @classmethod
    def of(cls, attrs: Attrs) -> LeaseData | None:
        """A wireguard node's data; None if it publishes no key. Raises ValueError if the data is unreadable."""
        data = [d if isinstance(d, Mapping) else {} for d in (attrs.backend_data, attrs.backend_v6_data)]
        key = data[0].get("PublicKey") or data[1].get("PublicKey")
        if key is None:
            return None
        try:
            if not isinstance(key, str) or len(base64.b64decode(key, validate=True)) != 32:
                raise ValueError
        except (binascii.Error, ValueError):
            raise ValueError("PublicKey is not a WireGuard key") from None
        ports = [d.get("Port") for d in data]
        for p in ports:
            if p is not None and (not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= 65535):
                raise ValueError(f"Port {p!r}")
        return cls(key, ports[0] or None, ports[1] or None)


@dataclass(frozen=True)
class PeerConfig:
    """A peer as configured on a device; what Weft compares and sets."""

    public_key: str  # base64
    endpoint: str | None  # "ip:port", "[ip6]:port"
    allowed_ips: tuple[str, ...]  # sorted CIDRs
    keepalive: int = 0
    psk: str | None = field(default=None, repr=False)  # base64; None: no preshared key


@dataclass(frozen=True)
class PeerState:
    config: PeerConfig
    last_handshake: float = 0.0  # seconds since the epoch; 0: never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class DeviceState:
    private_key: str | None = field(default=None, repr=False)  # base64; None: not set
    listen_port: int = 0
    peers: dict[str, PeerState] = field(default_factory=dict)  # by public key


@dataclass(frozen=True)
class Desired:
    peers: dict[str, PeerConfig]  # by public key
    nodes: dict[str, str]  # public key -> node name, for logs
    refused: dict[str, str]  # node -> why it is not programmed


def _private(ip: netaddr.IPAddress) -> bool:
    """RFC 1918, unique local, link-local and the like: an address the internet does not route."""
    return not ipaddress.ip_address(str(ip)).is_global


def endpoint_version(mode: str, own: Lease, peer: Lease) -> int | None:
    """The family of the underlay a peer is reached over: Mode ipv4 or ipv6 as it says, `separate` by the
    device (the caller passes ipv4 or ipv6), `auto` like Flannel's selectPublicEndpoint: the only family
    the peer publishes; else IPv4 if the peer's IPv4 address is public and this node has one; else IPv6
    if both ends' IPv6 addresses are public; else IPv4. None: the peer publishes no address for it."""
    v4, v6 = peer.public_ip, peer.attrs.public_ipv6
    if mode == "ipv4":
        return 4 if v4 is not None else None
    if mode == "ipv6":
        return 6 if v6 is not None else None
    if v4 is None or v6 is None:
        return 4 if v4 is not None else 6 if v6 is not None else None
    if not _private(v4) and own.public_ip is not None:
        return 4
    own6 = own.attrs.public_ipv6
    if not _private(v6) and own6 is not None and not _private(own6):
        return 6
    return 4


def desired_peers(own: Lease, own_key: str, leases: list[Lease], listen_port: int, keepalive: int,
                  psk: str | None, *, versions: tuple[int, ...] = (4,), mode: str = "ipv4") -> Desired:
    """The peers of one device: each node's pod subnets of `versions` (the families the device carries),
    at its address of the family `mode` picks and the port it publishes for that family."""
    claims: dict[str, list[str]] = {own_key: [own.node]}
    refused: dict[str, str] = {}
    published: dict[str, LeaseData] = {}
    for p in leases:
        try:
            data = LeaseData.of(p.attrs) if p.attrs.backend_type == "wireguard" else None
        except ValueError as e:
            refused[p.node] = f"publishes unreadable WireGuard data: {e}"
            continue
        if data is None:
            refused[p.node] = f"publishes no WireGuard public key (backend {p.attrs.backend_type})"
            continue
        published[p.node] = data
        claims.setdefault(data.public_key, []).append(p.node)
    peers: dict[str, PeerConfig] = {}
    nodes: dict[str, str] = {}
    for p in leases:
        if p.node in refused:
            continue
        data = published[p.node]
        key = data.public_key
        owners = claims[key]
        if len(owners) > 1:
            others = [n for n in owners if n != p.node]
            refused[p.node] = f"its public key {key} is also claimed by {', '.join(sorted(others))}"
            continue
        subnets = [s for s in (p.family_subnet(v) for v in versions) if s is not None]
        if not subnets:
            refused[p.node] = f"holds no IPv{' or IPv'.join(map(str, versions))} pod subnet"
            continue
        version = endpoint_version(mode, own, p)
        if version is None:
            refused[p.node] = f"publishes no {'IPv4' if mode == 'ipv4' else 'IPv6'} address to reach it at"
            continue
        ip = p.public_ip if version == 4 else p.attrs.public_ipv6
        assert ip is not None
        port = (data.port if version == 4 else data.port6) or listen_port
        peers[key] = PeerConfig(key, endpoint(ip, port), tuple(sorted(str(s) for s in subnets)), keepalive, psk)
        nodes[key] = p.node
    return Desired(peers, nodes, refused)


@dataclass(frozen=True)
class SetPeer:
    peer: PeerConfig


@dataclass(frozen=True)
class RemovePeer:
    public_key: str


PeerOp = SetPeer | RemovePeer


def plan(desired: dict[str, PeerConfig], actual: dict[str, PeerState]) -> list[PeerOp]:
    """Removals first (a rotated key's old peer holds the same allowed IPs), then additions and fixes.
    A set replaces the peer's allowed IPs and sets every field, so it also repairs drift."""
    ops: list[PeerOp] = [RemovePeer(k) for k in sorted(actual) if k not in desired]
    for key, want in sorted(desired.items()):
        have = actual.get(key)
        if have is None or have.config != want:
            ops.append(SetPeer(want))
    return ops
