"""The cluster network config (the role of Flannel's net-conf.json) and the daemon's own settings."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netaddr

from ipam.config import DEFAULT_DATA_DIR
from weftd.backend import BackendConfig, parse_config
from weftd.backend.errors import BackendConfigError
from weftlib.gojson import lookup_ci


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class FamilyConfig:
    """One address family's pod network and how it is cut into node subnets (Flannel's Network, SubnetLen,
    SubnetMin and SubnetMax, or their IPv6 twins)."""

    network: netaddr.IPNetwork
    subnet_len: int
    subnet_min: netaddr.IPNetwork
    subnet_max: netaddr.IPNetwork

    @property
    def version(self) -> int:
        return int(self.network.version)

    @classmethod
    def parse(cls, d: Mapping[str, Any], version: int) -> FamilyConfig:
        pre = "" if version == 4 else "IPv6"
        key = f"{pre}Network"
        raw = lookup_ci(d, key)
        if raw is None:
            raise ConfigError(f"{key} is required" + ("" if version == 4 else " when EnableIPv6 is true"))
        example = "10.244.0.0/16" if version == 4 else "fd00:10:244::/56"
        if not isinstance(raw, str):
            raise ConfigError(f"{key} {raw!r} must be a CIDR string such as {example!r}")
        if "/" not in raw:
            raise ConfigError(f"{key} {raw!r} has no prefix length: write it as a CIDR such as {example!r}")
        try:
            network = netaddr.IPNetwork(raw)
        except (netaddr.AddrFormatError, TypeError, ValueError) as e:
            raise ConfigError(f"{key} {raw!r} is not a CIDR: {e}") from None
        if network.version != version:
            raise ConfigError(f"{key} {raw!r} must be an IPv{version} CIDR")
        if network.network != network.ip:
            raise ConfigError(f"{key} {network} has host bits set")
        bits, small = (32, 28) if version == 4 else (128, 124)
        if network.prefixlen > small:
            raise ConfigError(f"{key} {network} is too small; it must be /{small} or larger")
        if version == 4:
            default_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
        else:
            default_len = 64 if network.prefixlen <= 62 else network.prefixlen + 2
        subnet_len = lookup_ci(d, f"{pre}SubnetLen", default_len)
        longest = bits - 2
        if (not isinstance(subnet_len, int) or isinstance(subnet_len, bool)
                or not network.prefixlen < subnet_len <= longest):
            raise ConfigError(f"{pre}SubnetLen {subnet_len!r} must be longer than /{network.prefixlen} "
                              f"and at most {longest}")
        size = 1 << (bits - subnet_len)
        first = netaddr.IPNetwork((network.first + size, subnet_len), version=version)  # Flannel skips the first
        last = netaddr.IPNetwork((network.last + 1 - size, subnet_len), version=version)

        def bound(name: str, default: netaddr.IPNetwork) -> netaddr.IPNetwork:
            raw = lookup_ci(d, f"{pre}{name}")
            if raw is None:
                return default
            if not isinstance(raw, str):
                raise ConfigError(f"{pre}{name} {raw!r} must be an address string")
            addr, _, plen = raw.partition("/")
            if plen and plen != str(subnet_len):
                raise ConfigError(f"{pre}{name} {raw!r} has prefix length /{plen}, but {pre}SubnetLen is "
                                  f"{subnet_len}: give the address alone")
            try:
                ip = netaddr.IPAddress(addr)
            except (netaddr.AddrFormatError, TypeError, ValueError) as e:
                raise ConfigError(f"{pre}{name} {raw!r} is not an address: {e}") from None
            sn = netaddr.IPNetwork((int(ip), subnet_len), version=version) if ip.version == version else None
            if sn is None or int(ip) % size or ip not in network:
                raise ConfigError(f"{pre}{name} {raw!r} must be the start of a /{subnet_len} inside {network}")
            return sn

        lo, hi = bound("SubnetMin", first), bound("SubnetMax", last)
        if lo.first > hi.first:
            raise ConfigError(f"{pre}SubnetMin {lo.ip} is above {pre}SubnetMax {hi.ip}")
        return cls(network.cidr, subnet_len, lo, hi)

    def to_json(self) -> dict[str, Any]:
        pre = "" if self.version == 4 else "IPv6"
        return {f"{pre}Network": str(self.network), f"{pre}SubnetLen": self.subnet_len,
                f"{pre}SubnetMin": str(self.subnet_min.ip), f"{pre}SubnetMax": str(self.subnet_max.ip)}

    def subnets(self) -> Iterator[netaddr.IPNetwork]:
        """Allocatable node subnets, SubnetMin to SubnetMax, lazily: an IPv6 network holds 2**64 of them."""
        size = self.subnet_min.size
        for start in range(self.subnet_min.first, self.subnet_max.first + 1, size):
            yield netaddr.IPNetwork((start, self.subnet_len), version=self.version)

    def valid(self, subnet: netaddr.IPNetwork | None) -> bool:
        """A lease kept from before is reused only if it still fits the network and the SubnetMin..Max range."""
        return (subnet is not None and subnet.version == self.version and subnet.prefixlen == self.subnet_len
                and self.subnet_min.first <= subnet.first <= self.subnet_max.first)


@dataclass(frozen=True)
class NetworkConfig:
    """The net-conf: an IPv4 family (unless EnableIPv4 is false), an IPv6 family (if EnableIPv6), the backend."""

    ipv4: FamilyConfig | None
    backend: BackendConfig
    ip_masq: bool = True
    ipv6: FamilyConfig | None = None

    @classmethod
    def parse(cls, d: Any) -> NetworkConfig:
        if not isinstance(d, dict):
            raise ConfigError("network config must be a JSON object")
        enable4, enable6 = lookup_ci(d, "EnableIPv4", True), lookup_ci(d, "EnableIPv6", False)
        for key, val in (("EnableIPv4", enable4), ("EnableIPv6", enable6)):
            if not isinstance(val, bool):
                raise ConfigError(f"{key} must be true or false, not {val!r}")
        if not enable4 and not enable6:
            raise ConfigError("EnableIPv4 and EnableIPv6 are both false: enable at least one family")
        ipv4 = FamilyConfig.parse(d, 4) if enable4 else None
        ipv6 = FamilyConfig.parse(d, 6) if enable6 else None
        masq = lookup_ci(d, "IPMasq", True)
        if not isinstance(masq, bool):
            raise ConfigError("IPMasq must be true or false")
        try:
            backend_config = parse_config(lookup_ci(d, "Backend"))
        except BackendConfigError as e:
            raise ConfigError(str(e)) from None
        return cls(ipv4, backend_config, masq, ipv6)

    @classmethod
    def load(cls, path: str | Path) -> NetworkConfig:
        try:
            return cls.parse(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"reading network config {path}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"network config {path}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"EnableIPv4": self.ipv4 is not None, "EnableIPv6": self.ipv6 is not None}
        for fam in self.families:
            out.update(fam.to_json())
        return {**out, "IPMasq": self.ip_masq, "Backend": self.backend.to_json()}

    @property
    def families(self) -> list[FamilyConfig]:
        """The enabled families, IPv4 first."""
        return [f for f in (self.ipv4, self.ipv6) if f is not None]

    def family(self, version: int) -> FamilyConfig | None:
        return self.ipv4 if version == 4 else self.ipv6

    @property
    def network(self) -> netaddr.IPNetwork | None:
        """The IPv4 pod network; None in an IPv6-only cluster."""
        return self.ipv4.network if self.ipv4 is not None else None

    @property
    def ipv6_network(self) -> netaddr.IPNetwork | None:
        return self.ipv6.network if self.ipv6 is not None else None

    @property
    def networks(self) -> list[netaddr.IPNetwork]:
        """Every enabled family's pod network, IPv4 first."""
        return [f.network for f in self.families]


@dataclass(frozen=True)
class Paths:
    subnet_file: Path = Path("/run/weft/subnet.env")
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    cni_conf_name: str = "10-weft.conflist"
    ipam_data_dir: Path = Path(DEFAULT_DATA_DIR)
    # Where weftd serves the weft plugin's invocations; None: the plugin always runs them itself.
    cni_socket: Path | None = Path("/run/weft/cni.sock")

    @property
    def conflist(self) -> Path:
        return self.cni_conf_dir / self.cni_conf_name

    @property
    def policy_state(self) -> Path:
        """The policy engine's record of the pods it bound, beside the subnet file."""
        return self.subnet_file.parent / "policy-pods.json"
