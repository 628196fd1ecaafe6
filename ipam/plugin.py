"""weft-ipam's CNI verbs. `weft` calls these in-process when its ipam type is weft-ipam."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from typing import Any

from cni_plugin import errors, skel
from cni_plugin.errors import CniError
from cni_plugin.result import IPConfig, Result
from ipam.allocator import allocate, free_count
from ipam.config import IPAddress, IPAMConfig, rangeset_str
from ipam.store import Store

PLUGIN = "weft-ipam"


def _store(cfg: IPAMConfig) -> Store:
    return Store(cfg.data_dir, cfg.network)


def _io(e: OSError, cfg: IPAMConfig) -> CniError:
    return CniError(errors.IO_FAILURE, f"IPAM store {cfg.data_dir}/{cfg.network}: {e.strerror or e}")


def cmd_add(args: skel.Args, conf: dict[str, Any]) -> Result:
    cfg = IPAMConfig.parse(conf, args)
    result = Result(routes=list(cfg.routes), dns=cfg.dns)
    got: list[IPAddress] = []
    try:
        with _store(cfg) as store:
            leases = store.leases()
            try:
                for i, rs in enumerate(cfg.range_sets):
                    ip, r = allocate(store, leases, rs, i, args.container_id, args.ifname, cfg.requested)
                    got.append(ip)
                    result.ips.append(IPConfig(ipaddress.ip_interface(f"{ip}/{r.subnet.prefixlen}"), r.gateway))
                unused = [ip for ip in cfg.requested if ip not in got]
                if unused:
                    raise CniError(errors.INVALID_CONFIG,
                                   f"failed to allocate all requested IPs: {', '.join(map(str, unused))}")
            except BaseException:
                for ip in got:
                    store.release(ip)
                raise
    except OSError as e:
        raise _io(e, cfg) from None
    return result


def release(cfg: IPAMConfig, container_id: str, ifname: str) -> None:
    store = _store(cfg)
    if not store.exists():
        return
    try:
        with store:
            for ip in store.owned_by(container_id, ifname):
                store.release(ip)
    except OSError as e:
        raise _io(e, cfg) from None


def cmd_del(args: skel.Args, conf: dict[str, Any]) -> None:
    release(IPAMConfig.parse(conf, args), args.container_id, args.ifname)


def cmd_check(args: skel.Args, conf: dict[str, Any]) -> None:
    cfg = IPAMConfig.parse(conf, args)
    store = _store(cfg)
    owned = []
    if store.exists():
        with store:
            owned = store.owned_by(args.container_id, args.ifname)
    missing = [rangeset_str(rs) for rs in cfg.range_sets if not any(ip in r for ip in owned for r in rs)]
    if missing:
        raise CniError(errors.INVALID_CONFIG,
                       f"{PLUGIN}: failed to find address added by container {args.container_id} "
                       f"in range set {', '.join(missing)}", msg="IPAM lease missing")


def valid_attachments(conf: dict[str, Any]) -> set[tuple[str, str]]:
    raw = conf.get("cni.dev/valid-attachments", conf.get("cni.dev/attachments"))
    if raw is None:
        return set()
    if not isinstance(raw, list):
        raise CniError(errors.INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    out = set()
    for a in raw:
        if not isinstance(a, dict) or not isinstance(a.get("containerID"), str) or not isinstance(a.get("ifname"), str):
            raise CniError(errors.INVALID_CONFIG, f"invalid attachment {a!r}: needs containerID and ifname strings")
        out.add((a["containerID"], a["ifname"]))
    return out


def collect(cfg: IPAMConfig, valid: Iterable[tuple[str, str]]) -> list[IPAddress]:
    """Releases every lease not owned by a valid attachment; returns the addresses freed."""
    valid = set(valid)
    valid_ids = {cid for cid, _ in valid}
    store = _store(cfg)
    if not store.exists():
        return []
    freed = []
    with store:
        for ip, owner in store.leases().items():
            keep = owner is not None and (
                (owner.container_id, owner.ifname) in valid
                or (owner.ifname is None and owner.container_id in valid_ids))
            if not keep:
                store.release(ip)
                freed.append(ip)
    return freed


def cmd_gc(args: skel.Args, conf: dict[str, Any]) -> None:
    cfg = IPAMConfig.parse(conf, args)
    try:
        collect(cfg, valid_attachments(conf))
    except OSError as e:
        raise _io(e, cfg) from None


def cmd_status(args: skel.Args, conf: dict[str, Any]) -> None:
    cfg = IPAMConfig.parse(conf, args)
    try:
        with _store(cfg) as store:
            leases = store.leases()
    except OSError as e:
        raise CniError(errors.NOT_AVAILABLE, f"IPAM store {cfg.data_dir}/{cfg.network} is unusable: "
                       f"{e.strerror or e}") from None
    full = [rangeset_str(rs) for rs in cfg.range_sets if free_count(leases, rs) <= 0]
    if full:
        raise CniError(errors.NOT_AVAILABLE, f"no IP addresses available in range set: {'; '.join(full)}")


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


def main() -> None:
    sys.exit(skel.run(PLUGIN, HANDLERS))
