"""The `weft` executable: containerd runs it for every pod.

When the network config names a weftd socket and weftd answers there, the
invocation runs inside the warm daemon and this process only carries it over;
otherwise, or for VERSION, it runs here. Either way the same code decides the
result. Imports stay minimal until the local path is taken.
"""

from __future__ import annotations

import os
import sys

from cni_plugin import handoff

MAX_STDIN = 1 << 20
TRY_AGAIN_LATER = 11


def _netns_fd(environ: os._Environ[str]) -> int | None:
    path = environ.get("CNI_NETNS")
    if not path:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None


def _delegated(raw: bytes) -> int | None:
    """The exit status of weftd's run of this invocation, or None to run it here."""
    environ = os.environ
    command = environ.get("CNI_COMMAND")
    if command not in handoff.SERVED:
        return None
    path = handoff.socket_path(raw)
    if path is None:
        return None
    fd = _netns_fd(environ)
    if fd is None and command in ("ADD", "CHECK"):
        return None  # the local run reports what is wrong with CNI_NETNS
    try:
        reply = handoff.call(path, raw, environ, fd)
    except handoff.Unanswered as e:
        if command != "ADD":
            return None  # DEL, CHECK, GC and STATUS are safe to repeat here
        import json

        version = json.loads(raw).get("cniVersion")  # parsed once already by socket_path
        sys.stdout.write(json.dumps({"cniVersion": version, "code": TRY_AGAIN_LATER,
                                     "msg": "weftd took the request but did not answer", "details": str(e)}) + "\n")
        return 1
    finally:
        if fd is not None:
            os.close(fd)
    if reply is None:
        return None
    status, out, err = reply
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


def main() -> None:
    raw = sys.stdin.buffer.read(MAX_STDIN + 1)
    status = _delegated(raw)
    if status is None:
        from cni_plugin import skel
        from cni_plugin.plugin import HANDLERS, PLUGIN

        status = skel.invoke(PLUGIN, HANDLERS, raw, os.environ).deliver()
    sys.stdout.flush()
    sys.exit(status)
