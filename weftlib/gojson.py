"""JSON read the way Go's encoding/json reads it, for configs written for Go programs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def lookup_ci(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Go decodes JSON keys case-insensitively (containerd's capability args, Flannel's net-conf); so do we."""
    for k, v in d.items():
        if k.lower() == key.lower():
            return v
    return default
