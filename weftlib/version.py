"""Weft's version: pyproject.toml's, as the installed package's metadata holds it (the frozen bundle
carries that metadata: packaging/weft.spec)."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("weft")
    except metadata.PackageNotFoundError:
        return "unknown"
