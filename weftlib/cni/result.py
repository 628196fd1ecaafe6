"""CNI results (SPEC section 5) for versions 0.3.0 to 1.1.0, parsed and printed in any of them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from weftlib.cni import errors
from weftlib.cni.errors import CniError
from weftlib.cni.version import version_tuple


def _bad(what: str) -> CniError:
    return CniError(errors.INVALID_CONFIG, f"prevResult/IPAM result: {what}")


def _str(d: dict[str, Any], key: str, default: str = "") -> str:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _bad(f"{key!r} must be a string")
    return v


def _int(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{key!r} must be an integer")
    return v


def _list(d: dict[str, Any], key: str) -> list[Any]:
    v = d.get(key) or []
    if not isinstance(v, list):
        raise _bad(f"{key!r} must be a list")
    return v


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad(f"{what} must be an object")
    return v


@dataclass
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int | None = None

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.mac:
            out["mac"] = self.mac
        if self.mtu and version == "1.1.0":
            out["mtu"] = self.mtu
        if self.sandbox:
            out["sandbox"] = self.sandbox
        return out


@dataclass
class IPConfig:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    interface: int | None = None

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if version_tuple(version) < (1, 0, 0):
            out["version"] = str(self.address.version)
        if self.interface is not None:
            out["interface"] = self.interface
        out["address"] = str(self.address)
        if self.gateway is not None:
            out["gateway"] = str(self.gateway)
        return out


@dataclass
class Route:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gw: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    mtu: int | None = None
    advmss: int | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None

    @classmethod
    def from_json(cls, d: Any) -> Route:
        d = _obj(d, "route")
        try:
            dst = ipaddress.ip_network(_str(d, "dst"), strict=False)
            gw = ipaddress.ip_address(_str(d, "gw")) if d.get("gw") else None
        except ValueError as e:
            raise _bad(f"route {d!r}: {e}") from None
        if gw is not None and gw.version != dst.version:
            raise _bad(f"route {d!r} mixes address families")
        return cls(dst, gw, _int(d, "mtu"), _int(d, "advmss"), _int(d, "priority"),
                   _int(d, "table"), _int(d, "scope"))

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"dst": str(self.dst)}
        if self.gw is not None:
            out["gw"] = str(self.gw)
        if version == "1.1.0":
            for key in ("mtu", "advmss", "priority", "table", "scope"):
                if (v := getattr(self, key)) is not None:
                    out[key] = v
        return out


@dataclass
class DNS:
    nameservers: list[str] = field(default_factory=list)
    domain: str = ""
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: Any) -> DNS:
        d = _obj(d or {}, "dns")
        lists = {}
        for key in ("nameservers", "search", "options"):
            v = _list(d, key)
            if not all(isinstance(x, str) for x in v):
                raise _bad(f"dns {key!r} must be a list of strings")
            lists[key] = v
        return cls(lists["nameservers"], _str(d, "domain"), lists["search"], lists["options"])

    def empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nameservers:
            out["nameservers"] = self.nameservers
        if self.domain:
            out["domain"] = self.domain
        if self.search:
            out["search"] = self.search
        if self.options:
            out["options"] = self.options
        return out


@dataclass
class Result:
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IPConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: DNS = field(default_factory=DNS)

    @classmethod
    def from_json(cls, d: Any) -> Result:
        d = _obj(d, "result")
        interfaces = []
        for i in _list(d, "interfaces"):
            i = _obj(i, "interface")
            interfaces.append(Interface(_str(i, "name"), _str(i, "mac"), _str(i, "sandbox"), _int(i, "mtu")))
        ips = []
        for ip in _list(d, "ips"):
            ip = _obj(ip, "ip")
            try:
                addr = ipaddress.ip_interface(_str(ip, "address"))
                gw = ipaddress.ip_address(_str(ip, "gateway")) if ip.get("gateway") else None
            except ValueError as e:
                raise _bad(f"ip {ip!r}: {e}") from None
            idx = _int(ip, "interface")
            if idx is not None and not 0 <= idx < len(interfaces):
                raise _bad(f"ip {ip!r} names interface {idx}, which does not exist")
            ips.append(IPConfig(addr, gw, idx))
        routes = [Route.from_json(r) for r in _list(d, "routes")]
        return cls(interfaces, ips, routes, DNS.from_json(d.get("dns")))

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            out["interfaces"] = [i.to_json(version) for i in self.interfaces]
        out["ips"] = [ip.to_json(version) for ip in self.ips]
        if self.routes:
            out["routes"] = [r.to_json(version) for r in self.routes]
        out["dns"] = self.dns.to_json()
        return out
