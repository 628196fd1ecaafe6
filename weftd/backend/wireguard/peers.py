"""What the device should hold, what it holds, and the changes between them. Pure logic.

Peers are derived from leases, one per node. A peer is identified on the device by its public
key, but Weft decides by node name: a node's key can change (rotation) and several nodes can
share one endpoint address (behind one NAT; Flannel's endpoint-based cleanup broke those, flannel
PR #2073), so nothing is ever removed because of its endpoint. A public key claimed by two nodes
is programmed for neither, as Calico does: which of them holds the private key cannot be told.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import netaddr

from weftd.lease import Lease

ZERO_KEY = "A" * 43 + "="  # base64 of 32 zero bytes: "no key" in both the kernel's and wireguard-go's answers


def endpoint(ip: netaddr.IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


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


def desired_peers(own: Lease, own_key: str, leases: list[Lease], listen_port: int, keepalive: int,
                  psk: str | None) -> Desired:
    claims: dict[str, list[str]] = {own_key: [own.node]}
    refused: dict[str, str] = {}
    for p in leases:
        if p.attrs.backend_type != "wireguard" or not p.attrs.public_key:
            refused[p.node] = f"publishes no WireGuard public key (backend {p.attrs.backend_type})"
            continue
        claims.setdefault(p.attrs.public_key, []).append(p.node)
    peers: dict[str, PeerConfig] = {}
    nodes: dict[str, str] = {}
    for p in leases:
        key = p.attrs.public_key
        if p.node in refused or key is None:
            continue
        owners = claims[key]
        if len(owners) > 1:
            others = [n for n in owners if n != p.node]
            refused[p.node] = f"its public key {key} is also claimed by {', '.join(sorted(others))}"
            continue
        peers[key] = PeerConfig(key, endpoint(p.public_ip, p.attrs.wg_port or listen_port), (str(p.subnet),),
                                keepalive, psk)
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
