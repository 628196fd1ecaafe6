"""`weft`'s network config, compatible with the reference bridge plugin's NetConf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weftlib.cni import errors
from weftlib.cni.errors import CniError
from weftlib.cni.result import DNS, Result
from weftlib.cni.skel import validate_ifname
from weftlib.kernel.netlink import DEFAULT_BRIDGE

# Options of the reference bridge that Weft does not implement: refuse them rather than ignore them.
_UNSUPPORTED = ("vlan", "vlanTrunk", "macspoofchk", "disableContainerInterface", "portIsolation")
MASQ_BACKENDS = ("nftables",)


def _invalid(msg: str) -> CniError:
    return CniError(errors.INVALID_CONFIG, msg)


def _bool(conf: dict[str, Any], key: str) -> bool:
    v = conf.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _invalid(f"{key!r} must be true or false, not {v!r}"[:200])
    return v


@dataclass(frozen=True)
class NetConf:
    name: str
    cni_version: str
    bridge: str = DEFAULT_BRIDGE
    is_gateway: bool = False
    is_default_gateway: bool = False
    force_address: bool = False
    ip_masq: bool = False
    mtu: int | None = None
    hairpin: bool = False
    promisc: bool = False
    enable_dad: bool = False
    ipam_type: str = ""
    dns: DNS | None = None
    prev_result: Result | None = None

    @classmethod
    def parse(cls, conf: dict[str, Any]) -> NetConf:
        for key in _UNSUPPORTED:
            if conf.get(key) not in (None, False, 0, [], ""):
                raise CniError(errors.UNSUPPORTED_FIELD, f"{key}={conf[key]!r} is not supported by weft"[:200])
        bridge = conf.get("bridge") or DEFAULT_BRIDGE
        why = validate_ifname(bridge) if isinstance(bridge, str) else "must be a string"
        if why:
            raise _invalid(f"bridge name {str(bridge)[:40]!r} {why}")
        mtu = conf.get("mtu")
        if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535):
            raise _invalid(f"mtu {mtu!r} must be an integer between 68 and 65535"[:200])
        hairpin, promisc = _bool(conf, "hairpinMode"), _bool(conf, "promiscMode")
        if hairpin and promisc:
            raise _invalid("cannot set hairpin mode and promiscuous mode at the same time")
        backend = conf.get("ipMasqBackend") or "nftables"  # the only one: weftlib.kernel.nat
        if backend not in MASQ_BACKENDS:
            raise CniError(errors.UNSUPPORTED_FIELD, f"ipMasqBackend {backend!r} must be one of {MASQ_BACKENDS}"[:200])
        ipam = conf.get("ipam")
        if not isinstance(ipam, dict):
            raise _invalid("IPAM config missing 'ipam' key")
        ipam_type = ipam.get("type")
        if not isinstance(ipam_type, str) or not ipam_type or "/" in ipam_type:
            raise _invalid(f"ipam type {ipam_type!r} must be the name of an IPAM plugin"[:200])
        dns = None
        if conf.get("dns"):
            try:
                dns = DNS.from_json(conf["dns"])
            except CniError as e:
                raise _invalid(f"dns: {e.details}") from None
        prev = Result.from_json(conf["prevResult"]) if conf.get("prevResult") else None
        is_default_gateway = _bool(conf, "isDefaultGateway")
        return cls(name=conf["name"], cni_version=conf["cniVersion"], bridge=bridge,
                   is_gateway=_bool(conf, "isGateway") or is_default_gateway,
                   is_default_gateway=is_default_gateway, force_address=_bool(conf, "forceAddress"),
                   ip_masq=_bool(conf, "ipMasq"), mtu=mtu, hairpin=hairpin,
                   promisc=promisc, enable_dad=_bool(conf, "enabledad"), ipam_type=ipam_type, dns=dns,
                   prev_result=prev)
