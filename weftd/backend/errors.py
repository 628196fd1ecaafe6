"""What goes wrong in a backend: at start (its config, its underlay, its devices) or while it reconciles."""

from __future__ import annotations


class BackendError(Exception):
    """The backend cannot program the kernel as it must: weftd reports it and, at start, stops."""


class BackendConfigError(ValueError):
    """`Backend` in the network config is not one the backend it names accepts (a ConfigError to the reader
    of the network config)."""
