"""weftd's side of the hand-over: runs `weft` invocations in this warm process.

Each connection is one invocation, served on its own thread through the same
`skel.invoke` the executable uses, so both paths decide alike. Only root (or
weftd's own user) may connect; the socket is created mode 0600.
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
from typing import Protocol

from cni_plugin.plugin import HANDLERS, PLUGIN
from weftd.metrics import Metrics
from weftlib.cni import errors, handoff, skel

log = logging.getLogger("weftd.cni")
# Invocations served at once. Most of an ADD's or DEL's wall time is the kernel waiting (RCU grace
# periods as veths are created, moved into the pod and deleted) with the GIL released, so a burst
# needs many in flight: with a handful, those waits queue one behind another. IPAM's flock still
# orders the address choices.
CONCURRENCY = 64


class PodHooks(Protocol):
    """Told of each pod this node attaches or detaches, before the runtime gets the answer."""

    def pod_added(self, environ: Mapping[str, str], stdout: str) -> None: ...

    def pod_deleted(self, environ: Mapping[str, str]) -> None: ...


class CniServer:
    def __init__(self, path: Path, metrics: Metrics, hooks: PodHooks | None = None) -> None:
        self.path = path
        self.metrics = metrics
        self.hooks = hooks
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
                with self._slots:
                    outcome = skel.invoke(PLUGIN, HANDLERS, raw, environ, fds[0] if fds else None)
                if self.hooks is not None and outcome.status == 0:
                    outcome = self._hook(command, raw, environ, fds, outcome)
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

    def _hook(self, command: str, raw: bytes, environ: dict[str, str], fds: list[int],
              outcome: skel.Outcome) -> skel.Outcome:
        """A pod's NetworkPolicy verdicts are in the kernel before its ADD returns; if they cannot be,
        the ADD is rolled back and fails, so no pod ever runs unprotected by weftd's choice."""
        assert self.hooks is not None
        if command == "DEL":
            try:
                self.hooks.pod_deleted(environ)
            except Exception as e:  # noqa: BLE001 - the pod is gone either way; the next apply catches up
                log.error("DEL %s: policy: %s", environ.get("CNI_CONTAINERID", ""), e)
            return outcome
        if command != "ADD":
            return outcome
        try:
            self.hooks.pod_added(environ, outcome.stdout)
            return outcome
        except Exception as e:  # noqa: BLE001 - any failure to protect the pod fails its ADD
            cid = environ.get("CNI_CONTAINERID", "")
            log.error("ADD %s: policy could not be applied, rolling back: %s", cid, e)
            undo = skel.invoke(PLUGIN, HANDLERS, raw, {**environ, "CNI_COMMAND": "DEL"}, fds[0] if fds else None)
            if undo.status != 0:
                log.error("ADD %s: rollback failed: %s", cid, undo.stdout.strip())
            version = skel.parse_config(raw).get("cniVersion", "1.0.0")
            err = errors.CniError(errors.TRY_AGAIN, f"NetworkPolicy could not be applied for this pod: {e}")
            return skel.Outcome(1, skel.json_line(err.to_json(str(version))), f"{PLUGIN}: {err}\n")
