"""`weft-py`, the Python plugin: runs one CNI invocation in this process.

containerd runs the compiled shim (`weft`, shim/weft-shim.c), which hands the
invocation to weftd and execs this program, with the same environment and stdin,
only when weftd is not there to take it. weftd runs the very same
`skel.invoke`, so both paths decide alike.
"""

from __future__ import annotations

import importlib.util
import sys
import types

from cni_plugin.plugin import HANDLERS, PLUGIN
from weftlib.cni import skel


def _lazy_pyroute2() -> None:
    """Registers the pyroute2 package without running its __init__, which imports all of pyroute2
    (IPRoute, NDB, IPDB, conntrack, ...: 150 ms, most of a local ADD). The plugin speaks netlink on
    its own (weftlib.kernel.rtnl) and needs pyroute2 only for the exception class of a kernel error.
    Anything that asks the package itself for a name still gets it: the first lookup of a name that
    is not a submodule runs the real __init__ into the same module."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    module = types.ModuleType("pyroute2")
    module.__spec__, module.__path__, module.__file__ = spec, list(spec.submodule_search_locations), spec.origin
    loader = spec.loader

    def lookup(name: str) -> object:
        try:  # `from pyroute2 import config`: a submodule, as without this module attribute hook
            return importlib.import_module(f"pyroute2.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pyroute2.{name}":
                raise
        delattr(module, "__getattr__")
        loader.exec_module(module)
        return getattr(module, name)

    setattr(module, "__getattr__", lookup)  # noqa: B010 - a module's own attribute hook
    sys.modules["pyroute2"] = module


def main() -> None:
    _lazy_pyroute2()
    sys.exit(skel.run(PLUGIN, HANDLERS, "Weft's CNI plugin: attaches a pod to the node bridge (the bridge "
                                        "plugin's config), handing the work to weftd when it runs."))
