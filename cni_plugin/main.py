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

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs 12 ms per pod

if TYPE_CHECKING:
    from collections.abc import Mapping

MAX_STDIN = 1 << 20


def _netns_fd(environ: Mapping[str, str]) -> int | None:
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
        from cni_plugin import errors, skel

        try:
            version = skel.parse_config(raw).get("cniVersion")
        except errors.CniError:
            version = None
        failure = errors.CniError(errors.TRY_AGAIN, f"weftd took the request but did not answer: {e}")
        version = version if version in skel.SUPPORTED_VERSIONS else skel.LATEST
        return skel.Outcome(1, skel.json_line(failure.to_json(version)), f"weft: {failure}\n").deliver()
    finally:
        if fd is not None:
            os.close(fd)
    if reply is None:
        return None
    status, out, err = reply
    sys.stdout.buffer.write(out)
    sys.stderr.buffer.write(err)
    return status


def main() -> None:
    raw = sys.stdin.buffer.read(MAX_STDIN + 1)
    status = _delegated(raw)
    if status is not None:
        # weftd did the work: nothing here needs the interpreter's teardown, which costs 1.5 ms.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    from cni_plugin import skel
    from cni_plugin.plugin import HANDLERS, PLUGIN

    status = skel.invoke(PLUGIN, HANDLERS, raw, os.environ).deliver()
    sys.stdout.flush()
    sys.exit(status)
