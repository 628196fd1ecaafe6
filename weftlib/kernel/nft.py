"""nftables commands run in-process through libnftables, the library the `nft` command is built on.

No process per command: an `nft` exec costs about 10 ms, a library call well under one.

A context (and its netlink socket) serves one thread at a time, and belongs to the network
namespace it was created in. Contexts are kept for reuse in that namespace, because closing an
nftables socket makes the kernel wait for the release of whatever earlier commands deleted (an
RCU grace period: 15-20 ms on the development machine, measured with strace on `nft delete
element`), so weftd, which keeps its contexts, pays that on no DEL. At most _MAX_IDLE are kept, the oldest
going first.
"""

from __future__ import annotations

import ctypes
import os
import threading

OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_lib: ctypes.CDLL | None = None
_lock = threading.Lock()
_idle: list[tuple[int, int]] = []  # (network namespace inode, context), free for any thread in that namespace
_MAX_IDLE = 16


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


def _new_context(lib: ctypes.CDLL) -> int:
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise Unavailable("libnftables could not create a context")
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_buffer_error(ctx)
    return int(ctx)


def run(commands: str, json_output: bool = False) -> tuple[int, str, str]:
    """(status, output, error) of an nft script, as `nft [-j] -f -` would give them.

    Raises Unavailable without libnftables.
    """
    lib = _library()
    netns = os.stat("/proc/thread-self/ns/net").st_ino
    ctx = None
    with _lock:
        for i, (ns, idle) in enumerate(_idle):
            if ns == netns:
                ctx = idle
                del _idle[i]
                break
    if ctx is None:
        ctx = _new_context(lib)
    keep = False
    try:
        lib.nft_ctx_output_set_flags(ctx, OUTPUT_JSON if json_output else 0)
        status = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
        out = lib.nft_ctx_get_output_buffer(ctx) or b""
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
        keep = True
        return status, out.decode(errors="replace"), err.decode(errors="replace")
    finally:
        if keep:
            with _lock:
                _idle.append((netns, ctx))
                # The oldest goes: it may belong to a namespace that is gone, which its socket keeps alive.
                ctx = _idle.pop(0)[1] if len(_idle) > _MAX_IDLE else None
        if ctx is not None:
            lib.nft_ctx_free(ctx)
