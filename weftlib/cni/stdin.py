"""The network config on stdin, read once and bounded. Built-in modules only: this runs for every pod."""

from __future__ import annotations

import sys

MAX_STDIN = 1 << 20


def read_stdin() -> bytes:
    """The config, plus one byte past the limit if there is more, so an oversized one is refused, not cut."""
    return sys.stdin.buffer.read(MAX_STDIN + 1)
