"""weftd's side of the hand-over: runs `weft` invocations in this warm process.

Each connection is one invocation, served on its own thread through the same
`skel.invoke` the executable uses, so both paths decide alike. Only root (or
weftd's own user) may connect; the socket is created mode 0600. The connection
only carries the invocation's bytes (weftlib.cni.handoff); what weftd adds to
an ADD is `invoke`'s: the hook is told of the pod as one typed value (weftd.pod),
and an ADD the hook refuses is undone and fails.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from cni_plugin.plugin import HANDLERS, PLUGIN
from weftd.metrics import Metrics
from weftd.pod import Attachment, PodHook, Refused
from weftlib.cni import errors, handoff, skel
from weftlib.cni.result import Result

log = logging.getLogger("weftd.cni")
# Invocations served at once. Most of an ADD's or DEL's wall time is the kernel waiting (RCU grace
# periods as veths are created, moved into the pod and deleted) with the GIL released, so a burst
# needs many in flight: with a handful, those waits queue one behind another. IPAM's flock still
# orders the address choices.
CONCURRENCY = 64


class CniServer:
    def __init__(self, path: Path, metrics: Metrics, hook: PodHook | None = None) -> None:
        self.path = path
        self.metrics = metrics
        self.hook = hook
        self._slots = threading.BoundedSemaphore(CONCURRENCY)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()  # left by a weftd that was killed
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(256)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="cni-accept", daemon=True)
        self._thread.start()
        log.info("serving CNI requests on %s", self.path)

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="cni-request", daemon=True).start()

    @staticmethod
    def _peer_allowed(conn: socket.socket) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid in (0, os.geteuid())

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            fds: list[int] = []
            try:
                if not self._peer_allowed(conn):
                    log.warning("refused a CNI request from a non-root peer")
                    return
                conn.settimeout(handoff.TIMEOUT)
                conn.sendall(handoff.GREETING)
                environ, raw, fds = handoff.read_request(conn)
            except (OSError, ValueError, EOFError, struct.error) as e:
                log.warning("unreadable CNI request: %s", e)
                return
            command = environ.get("CNI_COMMAND", "?")
            t = time.perf_counter()
            try:
                outcome = self.invoke(raw, environ, fds[0] if fds else None)
            finally:
                for fd in fds:
                    os.close(fd)
            label = command if command in skel.COMMANDS else "other"
            self.metrics.cni_requests.labels(label, "ok" if outcome.status == 0 else "error").inc()
            self.metrics.cni_seconds.labels(label).observe(time.perf_counter() - t)
            if outcome.stderr:
                log.info("%s %s: %s", command, environ.get("CNI_CONTAINERID", ""), outcome.stderr.strip())
            try:
                handoff.write_reply(conn, outcome.status, outcome.stdout, outcome.stderr)
            except OSError as e:
                log.warning("%s %s: the plugin went away before the reply: %s", command,
                            environ.get("CNI_CONTAINERID", ""), e)

    def invoke(self, raw: bytes, environ: Mapping[str, str], netns_fd: int | None) -> skel.Outcome:
        """One invocation, as the plugin would run it, then the hook. The hook is told of a pod before its ADD
        returns; if it cannot take the pod, the ADD is undone (a DEL) and fails with TRY_AGAIN, so no pod runs
        without what the hook must put in place (its NetworkPolicy verdicts)."""
        with self._slots:
            outcome = skel.invoke(PLUGIN, HANDLERS, raw, environ, netns_fd)
        if self.hook is None or outcome.status != 0 or outcome.args is None:
            return outcome
        args = outcome.args
        if args.command == "DEL":
            try:
                self.hook.detached(args.container_id)
            except Exception as e:  # noqa: BLE001 - the pod is gone either way; the next apply catches up
                log.error("DEL %s: %s", args.container_id, e)
            return outcome
        if args.command != "ADD":
            return outcome
        try:
            if not isinstance(outcome.result, Result):
                raise TypeError(f"the ADD answered {type(outcome.result).__name__}, not a result")
            self.hook.attached(Attachment.of(args, outcome.result))
            return outcome
        except Exception as e:  # noqa: BLE001 - whatever keeps the hook from taking the pod fails its ADD
            why = str(e) if isinstance(e, Refused) else f"weftd could not finish attaching this pod: {e}"
            log.error("ADD %s: %s; rolling back", args.container_id, why)
            undo = skel.invoke(PLUGIN, HANDLERS, raw, {**environ, "CNI_COMMAND": "DEL"}, netns_fd)
            if undo.status != 0:
                log.error("ADD %s: rollback failed: %s", args.container_id, undo.stdout.strip())
            version = skel.parse_config(raw).get("cniVersion", "1.0.0")
            err = errors.CniError(errors.TRY_AGAIN, why)
            return skel.Outcome(1, skel.json_line(err.to_json(str(version))), f"{PLUGIN}: {err}\n")
