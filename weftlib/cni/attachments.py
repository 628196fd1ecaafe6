"""`cni.dev/valid-attachments`: the attachments GC must keep (SPEC section 2, GC)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from weftlib.cni import errors
from weftlib.cni.errors import CniError

Attachment = tuple[str, str]  # (container ID, ifname)


def valid_attachments(conf: Mapping[str, Any]) -> set[Attachment]:
    """The (container ID, ifname) pairs a GC config names; an empty set if it names none."""
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
