"""sysctl writes through /proc/sys, which act on the calling thread's network namespace."""

from __future__ import annotations


def write(path: str, value: str, missing_ok: bool = True) -> bool:
    """Sets `path` (under /proc/sys) to `value` unless it already holds it; True if it changed.

    A missing file (an interface that is gone, a module not loaded) is not an error when `missing_ok`.
    """
    try:
        with open(path, "r+", encoding="ascii") as f:
            if f.read().strip() == value:
                return False
            f.seek(0)
            f.write(value)
            return True
    except FileNotFoundError:
        if not missing_ok:
            raise
        return False
