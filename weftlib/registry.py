"""Packages whose modules register themselves when imported (weftd's backends and subnet stores)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """The classes the modules of one package register, by name. `key` names a class."""

    def __init__(self, package: str, paths: Iterable[str], key: Callable[[T], str]) -> None:
        self.package = package
        self.paths = list(paths)
        self.key = key
        self._known: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: makes `cls` known by its name."""
        self._known[self.key(cls)] = cls
        return cls

    def all(self) -> dict[str, T]:
        """Every class of the package, by name: its modules register theirs when imported."""
        _import_modules(self.package, self.paths)
        return self._known


def _import_modules(package: str, paths: Iterable[str]) -> None:
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
