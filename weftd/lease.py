"""A node's subnet lease and what peers need to reach it (Flannel's LeaseAttrs, plus the node name)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import netaddr


class LeaseError(ValueError):
    pass


@dataclass(frozen=True)
class Attrs:
    """What a node publishes: where to reach it and how."""

    public_ip: netaddr.IPAddress
    backend_type: str
    vtep_mac: str | None = None
    vni: int | None = None
    public_key: str | None = None  # wireguard: the node's public key, base64
    wg_port: int | None = None  # wireguard: the port it listens on

    def backend_data(self) -> dict[str, Any] | None:
        if self.public_key is not None:
            return {"PublicKey": self.public_key, "Port": self.wg_port}  # Flannel's wireguard backend data
        if self.vtep_mac is None:
            return None
        return {"VNI": self.vni, "VtepMAC": self.vtep_mac}


@dataclass(frozen=True)
class Lease:
    node: str
    subnet: netaddr.IPNetwork
    attrs: Attrs

    @property
    def public_ip(self) -> netaddr.IPAddress:
        return self.attrs.public_ip

    def to_json(self) -> dict[str, Any]:
        return {"Node": self.node, "Subnet": str(self.subnet), "PublicIP": str(self.attrs.public_ip),
                "BackendType": self.attrs.backend_type, "BackendData": self.attrs.backend_data()}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, d: Any, subnet: str | None = None) -> Lease:
        if not isinstance(d, dict):
            raise LeaseError(f"lease must be an object, not {type(d).__name__}")
        try:
            net = netaddr.IPNetwork(subnet or d["Subnet"])
            ip = netaddr.IPAddress(d["PublicIP"])
            node = d.get("Node") or str(ip)
            data = d.get("BackendData") or {}
            mac, vni = data.get("VtepMAC"), data.get("VNI")
            if mac is not None:
                mac = str(netaddr.EUI(mac, dialect=netaddr.mac_unix_expanded))
            backend = d.get("BackendType") or "host-gw"
            key, port = data.get("PublicKey"), data.get("Port")
            if key is not None and len(base64.b64decode(key, validate=True)) != 32:
                raise ValueError("PublicKey is not a WireGuard key")
        except (KeyError, TypeError, AttributeError, ValueError, binascii.Error, netaddr.AddrFormatError) as e:
            raise LeaseError(f"unreadable lease {str(d)[:200]}: {e}") from None
        if not isinstance(node, str) or not isinstance(backend, str) or (vni is not None and not isinstance(vni, int)):
            raise LeaseError(f"unreadable lease {str(d)[:200]}")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535):
            raise LeaseError(f"unreadable lease {str(d)[:200]}: Port {port!r}")
        return cls(node, net.cidr, Attrs(ip, backend, mac, vni, key, port or None))
