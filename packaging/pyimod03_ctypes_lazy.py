"""Stands in for PyInstaller's `pyimod03_ctypes` bootstrap module (see weft.spec).

PyInstaller's bootstrap calls `pyimod03_ctypes.install()` on every start, which
imports ctypes (2.4 ms) to patch its library lookup. The `weft` client handing a
request to weftd never uses ctypes, so this install() defers the original one
(bundled as `pyimod03_ctypes_eager`) to the moment ctypes is first imported.
"""

import sys


class _CtypesHook:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "ctypes":
            return None
        sys.meta_path.remove(cls)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            import pyimod03_ctypes_eager

            pyimod03_ctypes_eager.install()

        spec.loader.exec_module = exec_then_install
        return spec


def install():
    sys.meta_path.insert(0, _CtypesHook)
