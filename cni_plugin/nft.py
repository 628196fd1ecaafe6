"""nftables commands run in-process through libnftables, the library the `nft` command is built on.

No process per command: an `nft` exec costs about 10 ms, a library call well under one.
Each call gets its own context, so threads never share one; a context works in the
network namespace of the thread that runs the command.
"""

from __future__ import annotations

import ctypes
import threading

OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_lib: ctypes.CDLL | None = None
_lock = threading.Lock()


class Unavailable(RuntimeError):
    """libnftables cannot be loaded or cannot create a context."""


def _library() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libnftables.so.1")
            except OSError:
                raise Unavailable("libnftables.so.1 is not installed (Debian: nftables)") from None
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
                getattr(lib, fn).argtypes = [ctypes.c_void_p]
            for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
                getattr(lib, fn).argtypes = [ctypes.c_void_p]
                getattr(lib, fn).restype = ctypes.c_char_p
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            _lib = lib
        return _lib


def run(commands: str, json_output: bool = False) -> tuple[int, str, str]:
    """(status, output, error) of an nft script, as `nft [-j] -f -` would give them.

    Raises Unavailable without libnftables.
    """
    lib = _library()
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise Unavailable("libnftables could not create a context")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        if json_output:
            lib.nft_ctx_output_set_flags(ctx, OUTPUT_JSON)
        status = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
        out = lib.nft_ctx_get_output_buffer(ctx) or b""
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
        return status, out.decode(errors="replace"), err.decode(errors="replace")
    finally:
        lib.nft_ctx_free(ctx)
