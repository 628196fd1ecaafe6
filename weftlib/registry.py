"""Packages whose modules register themselves when imported (weftd's backends and subnet stores)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable


def import_modules(package: str, paths: Iterable[str]) -> None:
    """Imports every public module and subpackage of `package` (found in its `__path__`), so that each
    registers itself.

    The directory is listed rather than asked through pkgutil.iter_modules(), which finds nothing in
    the frozen bundle: its modules are .pyc files served by PyInstaller's importer.
    """
    names = set()
    for d in paths:
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for entry in entries:
            stem, ext = os.path.splitext(entry)
            if stem.startswith("_") or stem.startswith("."):
                continue
            if ext in (".py", ".pyc") or (not ext and any(os.path.isfile(os.path.join(d, entry, f"__init__.{e}"))
                                                          for e in ("py", "pyc"))):
                names.add(stem)
    for name in sorted(names):
        importlib.import_module(f"{package}.{name}")
