"""wireguard-go, supervised: started in weftd's network namespace, restarted when it dies, left
running when weftd stops (it is the device: pod traffic keeps flowing across a weftd restart),
adopted again by the next weftd, stopped by `weftd uninstall`.

wireguard-go creates its TUN device in the namespace it runs in and serves the control socket
/var/run/wireguard/<ifname>.sock, which every namespace shares; `-f` keeps it in the foreground,
so weftd's child is the daemon itself and weftd reaps it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyroute2 import IPRoute

from weftd.backend.errors import BackendError
from weftd.backend.wireguard.device import Device, NotSupported
from weftd.backend.wireguard.peers import DeviceState, PeerOp
from weftd.backend.wireguard.uapi import SOCKET_DIR, Uapi
from weftlib.kernel.netlink import GROUP, owned

log = logging.getLogger("weftd.wireguard")
PROGRAM = "wireguard-go"


def _netns() -> str:
    return os.readlink("/proc/self/ns/net")


def find_daemons(ifname: str) -> list[tuple[int, bool]]:
    """wireguard-go processes serving `ifname`: (pid, in this network namespace)."""
    mine, out = _netns(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if not args or os.path.basename(args[0].decode(errors="replace")) != PROGRAM:
                continue
            if ifname.encode() not in args[1:]:
                continue
            out.append((int(proc.name), os.readlink(proc / "ns" / "net") == mine))
        except OSError:
            continue
    return out


class Userspace(Device):
    implementation = "userspace"

    def __init__(self, ifname: str, program: str | None = None, sock_dir: Path = SOCKET_DIR,
                 start_timeout: float = 10.0) -> None:
        super().__init__(ifname)
        self.program = program or shutil.which(PROGRAM) or ""
        self.uapi = Uapi(ifname, sock_dir)
        self.start_timeout = start_timeout
        self.pid: int | None = None
        self.restarts = 0
        self._child: subprocess.Popen[bytes] | None = None
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()  # one start at a time: the watcher's and the reconcile's

    def available(self) -> None:
        if not self.program or not os.access(self.program, os.X_OK):
            raise NotSupported(f"{PROGRAM} is not installed (Debian package wireguard-go)")

    # --- the process -------------------------------------------------------------------

    def _adopt(self) -> int | None:
        """A wireguard-go left running by an earlier weftd, if it serves our device here."""
        found = find_daemons(self.ifname)
        foreign = [pid for pid, here in found if not here]
        if foreign:
            raise BackendError(f"device name {self.ifname} is taken by {PROGRAM} pid {foreign[0]} in another network "
                               f"namespace; {SOCKET_DIR} is shared by all namespaces, so names must be unique on "
                               "the host (--wireguard-device)")
        here = [pid for pid, _ in found]
        return here[0] if here else None

    def _start(self) -> int:
        self.available()
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "WG_PROCESS_FOREGROUND": "1",
               "LOG_LEVEL": "error"}
        # Its log goes where weftd's goes. Its own session: a signal to weftd's process group
        # (Ctrl-C) does not take the device down with it.
        child = subprocess.Popen([self.program, "-f", self.ifname], env=env, stdin=subprocess.DEVNULL,
                                 stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno(),
                                 start_new_session=True, close_fds=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise BackendError(f"{PROGRAM} for {self.ifname} exited at start with {child.returncode}; "
                                   "see its message above")
            if self.uapi.alive():
                self._child = child
                return child.pid
            time.sleep(0.02)
        child.kill()
        child.wait()
        raise BackendError(f"{PROGRAM} for {self.ifname} did not open {self.uapi.path} within {self.start_timeout}s")

    def _running(self) -> bool:
        if self.pid is None:
            return False
        if self._child is not None and self._child.pid == self.pid:
            return self._child.poll() is None
        try:
            return Path(f"/proc/{self.pid}/cmdline").read_bytes() != b""  # a zombie has no command line
        except OSError:
            return False

    def ensure(self, ipr: IPRoute) -> bool:
        with self._lock:
            link = self.link(ipr)
            started = False
            if not (self._running() and self.uapi.alive() and link is not None):
                pid = self._adopt() if self.pid is None else None
                if pid is not None and link is not None and self.uapi.alive():
                    log.info("adopted %s pid %d serving %s", PROGRAM, pid, self.ifname)
                else:
                    if pid is not None:  # half there: start clean
                        self._stop_pid(pid)
                    link = self.link(ipr)
                    self.check_owned(link)
                    pid = self._start()
                    if self.pid is not None:
                        self.restarts += 1
                    started = True
                    log.info("started %s pid %d for %s", PROGRAM, pid, self.ifname)
                    link = self.link(ipr)
                self.pid = pid
                self._watch()
            if link is None:
                raise BackendError(f"{PROGRAM} runs but {self.ifname} does not exist")
            if not owned(link):
                # Only a wireguard-go serving this name in this namespace gets here: one weftd started.
                ipr.link("set", index=link["index"], group=GROUP)
            return started

    def _watch(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._supervise, name="wireguard-go", daemon=True)
            self._watcher.start()

    def _wait_exit(self, pid: int) -> str:
        if self._child is not None and self._child.pid == pid:
            code = self._child.wait()
            return f"signal {-code}" if code < 0 else f"code {code}"
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return "unknown status"
        try:
            select.select([fd], [], [])
        finally:
            os.close(fd)
        return "unknown status (not weftd's child)"

    def _supervise(self) -> None:
        quick = 0
        while not self._closing.is_set():
            pid = self.pid
            if pid is None:
                return
            began = time.monotonic()
            how = self._wait_exit(pid)
            if self._closing.is_set():
                return
            log.error("%s pid %d for %s exited (%s); restarting it", PROGRAM, pid, self.ifname, how)
            quick = quick + 1 if time.monotonic() - began < 10 else 0
            if quick > 1:
                self._closing.wait(min(30.0, 2.0 ** (quick - 1)))
            try:
                with self._lock:
                    if self.pid != pid:
                        continue  # a reconciliation got there first
                    self.pid = self._start()
                self.restarts += 1
                log.info("restarted %s for %s: pid %d", PROGRAM, self.ifname, self.pid)
            except BackendError as e:
                log.error("%s; retrying", e)
                continue
            if self.on_restart is not None:
                try:
                    self.on_restart()
                except Exception as e:  # noqa: BLE001 - the next reconciliation retries
                    log.error("configuring the restarted %s: %s", self.ifname, e)

    def _stop_pid(self, pid: int, timeout: float = 5.0) -> None:
        try:
            os.kill(pid, signal.SIGTERM)  # it removes its TUN device and socket
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._child is not None and self._child.pid == pid:
                if self._child.poll() is not None:
                    return
            else:
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes() == b"":
                        return
                except OSError:
                    return
            time.sleep(0.02)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # --- configuration -----------------------------------------------------------------

    def state(self) -> DeviceState:
        return self.uapi.get()

    def set(self, private_key: str | None = None, listen_port: int | None = None,
            ops: list[PeerOp] | tuple[PeerOp, ...] = ()) -> None:
        self.uapi.set(private_key, listen_port, ops)

    def remove(self, ipr: IPRoute) -> None:
        self._closing.set()
        for pid, here in find_daemons(self.ifname):
            if here:
                self._stop_pid(pid)
                log.info("stopped %s pid %d (%s)", PROGRAM, pid, self.ifname)
        link = self.link(ipr)
        if owned(link):
            try:
                ipr.link("del", index=link["index"])
            except OSError as e:
                if getattr(e, "code", None) != errno.ENODEV:
                    raise

    def describe(self) -> str:
        return f"userspace ({PROGRAM} pid {self.pid}, restarts {self.restarts})"

    def close(self) -> None:
        """weftd stops: wireguard-go stays, it is the device."""
        self._closing.set()
