"""The cluster network config (the role of Flannel's net-conf.json) and the daemon's own settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import netaddr

from weftlib.gojson import lookup_ci

if TYPE_CHECKING:
    from weftd.backend import BackendConfig


class ConfigError(Exception):
    pass


Env = Callable[[str, Any], Any]  # a command-line flag's default from the environment (WEFTD_<FLAG>)


@dataclass(frozen=True)
class NetworkConfig:
    network: netaddr.IPNetwork
    subnet_len: int
    backend: BackendConfig
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
        from weftd import backend  # it imports this module for ConfigError

        return cls(network.cidr, subnet_len, backend.parse_config(lookup_ci(d, "Backend")), masq)

    @classmethod
    def load(cls, path: str | Path) -> NetworkConfig:
        try:
            return cls.parse(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"reading network config {path}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        return {"Network": str(self.network), "SubnetLen": self.subnet_len, "IPMasq": self.ip_masq,
                "Backend": self.backend.to_json()}

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
