"""The wireguard backend's config: Flannel's wireguard keys under `Backend`."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weftd.backend import BackendConfig
from weftd.backend.errors import BackendConfigError
from weftlib.gojson import lookup_ci

WG_MODES = ("separate", "auto", "ipv4", "ipv6")


def wg_key(value: Any, what: str) -> bytes:
    """A WireGuard key as WireGuard tools write it: 32 bytes, base64."""
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise BackendConfigError(f"{what} must be a WireGuard key: 32 bytes in base64, as `wg genpsk` prints")
    return raw


def _port(d: Mapping[str, Any], key: str, default: int) -> int:
    port = lookup_ci(d, key, default)
    if port == 0:
        port = default
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise BackendConfigError(f"Backend.{key} {port!r} must be a UDP port from 1 to 65535")
    return port


@dataclass(frozen=True)
class WireGuardConfig(BackendConfig):
    """Flannel's wireguard keys. Mode separate: an IPv4 device on ListenPort and an IPv6 device on
    ListenPortV6; auto, ipv4, ipv6: one device on ListenPort for both families."""

    psk: str | None = field(default=None, repr=False)  # cluster-wide preshared key, base64; never logged
    listen_port: int = 51820
    listen_port_v6: int = 51821
    keepalive: int = 0  # PersistentKeepaliveInterval, seconds; 0 = off
    mode: str = "separate"

    @classmethod
    def fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        psk = lookup_ci(d, "PSK")
        if psk in (None, ""):
            psk = None
        else:
            wg_key(psk, "Backend.PSK")
        port, port6 = _port(d, "ListenPort", 51820), _port(d, "ListenPortV6", 51821)
        keepalive = lookup_ci(d, "PersistentKeepaliveInterval", 0)
        if not isinstance(keepalive, int) or isinstance(keepalive, bool) or not 0 <= keepalive <= 65535:
            raise BackendConfigError(f"Backend.PersistentKeepaliveInterval {keepalive!r} must be seconds "
                                     "from 0 to 65535")
        mode = lookup_ci(d, "Mode", "separate")
        if not isinstance(mode, str) or mode.lower() not in WG_MODES:
            raise BackendConfigError(f"Backend.Mode {mode!r} must be one of {', '.join(WG_MODES)}")
        mode = mode.lower()
        if mode == "separate" and port == port6:
            raise BackendConfigError(f"Backend.ListenPort and ListenPortV6 are both {port}; Mode separate needs "
                                     "two ports")
        return {**super().fields(d), "psk": psk, "listen_port": port, "listen_port_v6": port6,
                "keepalive": keepalive, "mode": mode}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {**super().to_json(), "ListenPort": self.listen_port, "ListenPortV6": self.listen_port_v6,
                               "PersistentKeepaliveInterval": self.keepalive, "Mode": self.mode}
        if self.psk:
            out["PSK"] = self.psk
        return out
