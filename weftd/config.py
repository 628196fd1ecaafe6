"""The cluster network config (the role of Flannel's net-conf.json) and the daemon's own settings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netaddr

from ipam.config import lookup_ci

BACKENDS = ("vxlan", "host-gw")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class BackendConfig:
    type: str = "vxlan"
    vni: int = 1
    port: int = 8472
    mtu: int | None = None  # the underlay MTU to assume; default: the interface's
    direct_routing: bool = False

    @classmethod
    def parse(cls, d: dict[str, Any] | None) -> BackendConfig:
        d = d or {}
        kind = lookup_ci(d, "Type", "vxlan")
        if kind not in BACKENDS:
            raise ConfigError(f"Backend.Type {kind!r} must be one of {BACKENDS}")
        vni, port, mtu = lookup_ci(d, "VNI", 1), lookup_ci(d, "Port", 8472) or 8472, lookup_ci(d, "MTU")
        if not isinstance(vni, int) or not 1 <= vni < 1 << 24:
            raise ConfigError(f"Backend.VNI {vni!r} must be an integer from 1 to 16777215")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"Backend.Port {port!r} must be a UDP port")
        if mtu is not None and (not isinstance(mtu, int) or not 576 <= mtu <= 65535):
            raise ConfigError(f"Backend.MTU {mtu!r} must be an integer from 576 to 65535")
        direct = lookup_ci(d, "DirectRouting", False)
        if not isinstance(direct, bool):
            raise ConfigError("Backend.DirectRouting must be true or false")
        return cls(kind, vni, port, mtu, direct)


@dataclass(frozen=True)
class NetworkConfig:
    network: netaddr.IPNetwork
    subnet_len: int
    backend: BackendConfig = field(default_factory=BackendConfig)
    ip_masq: bool = True

    @classmethod
    def parse(cls, d: Any) -> NetworkConfig:
        if not isinstance(d, dict):
            raise ConfigError("network config must be a JSON object")
        try:
            network = netaddr.IPNetwork(lookup_ci(d, "Network", ""))
        except (netaddr.AddrFormatError, TypeError, ValueError) as e:
            raise ConfigError(f"Network {lookup_ci(d, 'Network')!r} is not a CIDR: {e}") from None
        if network.version != 4:
            raise ConfigError("Network must be an IPv4 CIDR")
        if network.network != network.ip:
            raise ConfigError(f"Network {network} has host bits set")
        if network.prefixlen > 28:
            raise ConfigError(f"Network {network} is too small; it must be /28 or larger")
        default_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
        subnet_len = lookup_ci(d, "SubnetLen", default_len)
        if not isinstance(subnet_len, int) or not network.prefixlen < subnet_len <= 30:
            raise ConfigError(f"SubnetLen {subnet_len!r} must be longer than /{network.prefixlen} and at most 30")
        masq = lookup_ci(d, "IPMasq", True)
        if not isinstance(masq, bool):
            raise ConfigError("IPMasq must be true or false")
        return cls(network.cidr, subnet_len, BackendConfig.parse(lookup_ci(d, "Backend")), masq)

    @classmethod
    def load(cls, path: str | Path) -> NetworkConfig:
        try:
            return cls.parse(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"reading network config {path}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        b = self.backend
        backend: dict[str, Any] = {"Type": b.type, "VNI": b.vni, "Port": b.port, "DirectRouting": b.direct_routing}
        if b.mtu:
            backend["MTU"] = b.mtu
        return {"Network": str(self.network), "SubnetLen": self.subnet_len, "IPMasq": self.ip_masq,
                "Backend": backend}

    def subnets(self) -> list[netaddr.IPNetwork]:
        """Allocatable node subnets. The first is skipped, as Flannel does, so the network address stays free."""
        return list(self.network.subnet(self.subnet_len))[1:]


@dataclass(frozen=True)
class Paths:
    subnet_file: Path = Path("/run/weft/subnet.env")
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    cni_conf_name: str = "10-weft.conflist"
    ipam_data_dir: Path = Path("/var/lib/cni/networks")
    # Where weftd serves the weft plugin's invocations; None: the plugin always runs them itself.
    cni_socket: Path | None = Path("/run/weft/cni.sock")

    @property
    def conflist(self) -> Path:
        return self.cni_conf_dir / self.cni_conf_name
