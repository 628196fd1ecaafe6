"""Delegating to the IPAM plugin (SPEC section 4, "delegated plugins"): weft-ipam in-process with the
config the caller already parsed, anything else executed from CNI_PATH."""

from __future__ import annotations

import json
import os
import subprocess
from typing import TYPE_CHECKING, Any

from weftlib.cni import errors
from weftlib.cni.errors import CniError
from weftlib.cni.result import Result
from weftlib.cni.skel import Args

if TYPE_CHECKING:
    from ipam.config import IPAMConfig
    from weftlib.cni.attachments import Attachment

IN_PROCESS = "weft-ipam"


def find(plugin: str, path: tuple[str, ...]) -> str:
    for d in path:
        exe = os.path.join(d, plugin)
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    raise CniError(errors.INVALID_CONFIG, f"failed to find plugin {plugin!r} in path {list(path)}")


def ipam(command: str, args: Args, conf: dict[str, Any], plugin: str, parsed: IPAMConfig | None = None,
         valid: set[Attachment] | None = None) -> Result | None:
    """Runs `command` of the IPAM plugin. `parsed`: weft-ipam's config, if the caller has parsed it;
    `valid`: GC's valid attachments, as the caller parsed them."""
    if plugin == IN_PROCESS:
        from ipam import plugin as weft_ipam
        from ipam.config import IPAMConfig

        return weft_ipam.run(command, args, parsed or IPAMConfig.parse(conf, args), valid or set())
    env = dict(args.environ)
    env["CNI_COMMAND"] = command
    try:
        p = subprocess.run([find(plugin, args.path)], input=json.dumps(conf).encode(), env=env,
                           stdout=subprocess.PIPE, check=False)
    except OSError as e:
        raise CniError(errors.IO_FAILURE, f"running IPAM plugin {plugin}: {e.strerror}") from None
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0:
        try:
            err = json.loads(out)
            raise CniError(int(err["code"]), f"{plugin}: {err.get('details') or ''}".rstrip(": "),
                           msg=str(err.get("msg") or "") or None)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CniError(errors.INTERNAL, f"IPAM plugin {plugin} failed: {out.strip()[:500]}") from None
    if command != "ADD":
        return None
    try:
        return Result.from_json(json.loads(out))
    except ValueError:
        raise CniError(errors.DECODE, f"IPAM plugin {plugin} printed an unreadable result") from None
