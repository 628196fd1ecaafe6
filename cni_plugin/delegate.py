"""Running the IPAM plugin: weft-ipam in-process, anything else from CNI_PATH (SPEC section 4)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from cni_plugin import errors
from cni_plugin.errors import CniError
from cni_plugin.result import Result
from cni_plugin.skel import Args

IN_PROCESS = "weft-ipam"


def find(plugin: str, path: tuple[str, ...]) -> str:
    for d in path:
        exe = os.path.join(d, plugin)
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    raise CniError(errors.INVALID_CONFIG, f"failed to find plugin {plugin!r} in path {list(path)}")


def ipam(command: str, args: Args, conf: dict[str, Any], plugin: str) -> Result | None:
    if plugin == IN_PROCESS:
        from ipam import plugin as weft_ipam

        return weft_ipam.HANDLERS[command](args, conf)
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
