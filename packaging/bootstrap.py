"""Weft's start-up script for the frozen bundle, in place of PyInstaller's pyiboot01_bootstrap.

It does what PyInstaller's does, less two things that cost every `weft` run, which
containerd makes for every pod, about 3.5 ms together:
- PyInstaller's ctypes hook imports ctypes (2.4 ms) on every start. Here it is
  installed when ctypes is first imported; a `weft` handing its request to weftd
  never imports it.
- PyInstaller's version stats every top-level entry of the bundle (about 180) to find
  unpacked .egg directories. weft.spec refuses to build a bundle that has any.
"""

def _weft_bootstrap():  # a function, so that nothing is left in the namespace of __main__
    import os
    import sys

    import pyimod02_importers

    pyimod02_importers.install()
    if not hasattr(sys, "frozen"):
        sys.frozen = True
    if "VIRTUAL_ENV" in os.environ:
        os.environ["VIRTUAL_ENV"] = ""
        del os.environ["VIRTUAL_ENV"]
    import encodings  # noqa: F401 - as PyInstaller's bootstrap does

    if sys.warnoptions:
        import warnings  # noqa: F401

    class _CtypesHook:
        """Runs PyInstaller's ctypes hook right after the first import of ctypes."""

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

            def exec_then_hook(module):
                exec_module(module)
                import pyimod03_ctypes

                pyimod03_ctypes.install()

            spec.loader.exec_module = exec_then_hook
            return spec

    sys.meta_path.insert(0, _CtypesHook)


_weft_bootstrap()
del _weft_bootstrap
