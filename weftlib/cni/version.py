"""The CNI spec versions Weft speaks, and which verbs each allows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from weftlib.cni import errors
from weftlib.cni.errors import CniError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
_SINCE = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def check_version(conf: Mapping[str, Any], command: str) -> str:
    """The config's cniVersion, if Weft speaks it and it allows `command`."""
    version = conf.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(errors.INCOMPATIBLE_VERSION,
                       f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}")
    need = _SINCE.get(command)
    if need and version_tuple(version) < version_tuple(need):
        raise CniError(errors.INCOMPATIBLE_VERSION, f"config version {version} does not allow {command}")
    return version
