"""weft-ipam's CNI verbs. `weft` runs them in-process (`run`) with the config it parsed, when its ipam
type is weft-ipam; the `weft-ipam` executable parses its config and runs the same functions."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from typing import Any

from ipam.allocator import allocate, free_count
from ipam.config import IPAMConfig, rangeset_str
from ipam.reservations import Reservations
from weftlib.cni import errors, skel
from weftlib.cni.attachments import Attachment, valid_attachments
from weftlib.cni.errors import CniError
from weftlib.cni.result import IPConfig, Result
from weftlib.ipnet import IPAddress

PLUGIN = "weft-ipam"


def _reservations(cfg: IPAMConfig) -> Reservations:
    return Reservations(cfg.data_dir, cfg.network)


def _io(e: OSError, cfg: IPAMConfig) -> CniError:
    return CniError(errors.IO_FAILURE, f"IPAM data directory {cfg.data_dir}/{cfg.network}: {e.strerror or e}")


def add(args: skel.Args, cfg: IPAMConfig) -> Result:
    result = Result(routes=list(cfg.routes), dns=cfg.dns)
    got: list[IPAddress] = []
    try:
        with _reservations(cfg) as held:
            taken = held.all()
            try:
                for i, rs in enumerate(cfg.range_sets):
                    ip, r = allocate(held, taken, rs, i, args.container_id, args.ifname, cfg.requested)
                    got.append(ip)
                    result.ips.append(IPConfig(ipaddress.ip_interface(f"{ip}/{r.subnet.prefixlen}"), r.gateway))
                unused = [ip for ip in cfg.requested if ip not in got]
                if unused:
                    raise CniError(errors.INVALID_CONFIG,
                                   f"failed to allocate all requested IPs: {', '.join(map(str, unused))}")
            except BaseException:
                for ip in got:
                    held.release(ip)
                raise
    except OSError as e:
        raise _io(e, cfg) from None
    return result


def release(args: skel.Args, cfg: IPAMConfig) -> None:
    held = _reservations(cfg)
    if not held.exists():
        return
    try:
        with held:
            for ip in held.owned_by(args.container_id, args.ifname):
                held.release(ip)
    except OSError as e:
        raise _io(e, cfg) from None


def check(args: skel.Args, cfg: IPAMConfig) -> None:
    held = _reservations(cfg)
    owned = []
    if held.exists():
        with held:
            owned = held.owned_by(args.container_id, args.ifname)
    missing = [rangeset_str(rs) for rs in cfg.range_sets if not any(ip in r for ip in owned for r in rs)]
    if missing:
        raise CniError(errors.INVALID_CONFIG,
                       f"{PLUGIN}: failed to find address added by container {args.container_id} "
                       f"in range set {', '.join(missing)}", msg="IPAM reservation missing")


def collect(cfg: IPAMConfig, valid: Iterable[Attachment]) -> list[IPAddress]:
    """Releases every reservation not owned by a valid attachment; returns the addresses freed."""
    valid = set(valid)
    valid_ids = {cid for cid, _ in valid}
    held = _reservations(cfg)
    if not held.exists():
        return []
    freed = []
    try:
        with held:
            for ip, owner in held.all().items():
                keep = owner is not None and (
                    (owner.container_id, owner.ifname) in valid
                    or (owner.ifname is None and owner.container_id in valid_ids))
                if not keep:
                    held.release(ip)
                    freed.append(ip)
    except OSError as e:
        raise _io(e, cfg) from None
    return freed


def status(cfg: IPAMConfig) -> None:
    try:
        with _reservations(cfg) as held:
            taken = held.all()
    except OSError as e:
        raise CniError(errors.NOT_AVAILABLE, f"IPAM data directory {cfg.data_dir}/{cfg.network} is unusable: "
                       f"{e.strerror or e}") from None
    full = [rangeset_str(rs) for rs in cfg.range_sets if free_count(taken, rs) <= 0]
    if full:
        raise CniError(errors.NOT_AVAILABLE, f"no IP addresses available in range set: {'; '.join(full)}")


def run(command: str, args: skel.Args, cfg: IPAMConfig, valid: set[Attachment]) -> Result | None:
    """One verb with the config already parsed; `valid`: GC's valid attachments."""
    if command == "ADD":
        return add(args, cfg)
    if command == "DEL":
        release(args, cfg)
    elif command == "CHECK":
        check(args, cfg)
    elif command == "GC":
        collect(cfg, valid)
    elif command == "STATUS":
        status(cfg)
    return None


def _handler(command: str) -> skel.Handler:
    def handle(args: skel.Args, conf: dict[str, Any]) -> Result | None:
        return run(command, args, IPAMConfig.parse(conf, args), valid_attachments(conf) if command == "GC" else set())
    return handle


HANDLERS = {command: _handler(command) for command in skel.VERBS}


def main() -> None:
    sys.exit(skel.run(PLUGIN, HANDLERS, "Weft's IPAM plugin: pod addresses from the ranges of its config "
                                        "(host-local's config and data directory)."))
