"""Retrying what weftd cannot reach (a store, the API server): capped exponential backoff with jitter, every wait
ended at once by weftd's stop event, and few log lines: one when a failure starts, one a minute while it lasts
(with the count of attempts), one when it ends.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger("weftd")
T = TypeVar("T")
TICK = 0.1  # how soon a wait on something else notices the stop event


class Stopped(Exception):
    """weftd was asked to stop while this waited or retried."""


def wait_either(event: threading.Event, stop: threading.Event, timeout: float) -> bool:
    """Waits until `event` is set (True), `stop` is set or `timeout` seconds pass (False). Python waits on one event
    at a time, so `event` is waited on in slices of TICK seconds."""
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return event.is_set()
        if event.wait(min(TICK, left)):
            return True
    return False


@dataclass
class Backoff:
    """The delay before each next attempt: `initial`, multiplied by `factor` after every failure up to `cap`, each
    delay spread by ±`jitter` (a fraction) so that many nodes do not retry in step."""

    initial: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    rand: Callable[[], float] = random.random  # uniform in [0, 1)
    failures: int = 0

    def next(self) -> float:
        """The delay after one more failure."""
        base = min(self.cap, self.initial * self.factor ** min(self.failures, 64))
        self.failures += 1
        return base * (1 + self.jitter * (2 * self.rand() - 1))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class Retry:
    """One thing weftd keeps trying (`what`, e.g. "acquiring this node's lease"): its backoff and its log lines.

    `failed(error)` after each failed attempt: logs when a failure starts and then at most once per `every` seconds,
    and returns the delay before the next attempt. `ok()` after a success: logs the recovery if it followed
    failures. `pause(error)` and `call(fn)` also wait, on `stop`, and raise Stopped once it is set."""

    what: str
    stop: threading.Event
    logger: logging.Logger = log
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.monotonic
    every: float = 60.0
    attempts: int = field(init=False, default=0)  # failed attempts since the failure started
    since: float | None = field(init=False, default=None)  # when it started; None while all is well
    _logged: float = field(init=False, default=0.0)

    def failed(self, error: object) -> float:
        now = self.clock()
        self.attempts += 1
        if self.since is None:
            self.since = self._logged = now
            self.logger.warning("%s: %s; retrying", self.what, error)
        elif now - self._logged >= self.every:
            self._logged = now
            self.logger.warning("%s: still failing after %d attempts in %s: %s", self.what, self.attempts,
                                _duration(now - self.since), error)
        else:
            self.logger.debug("%s: attempt %d failed: %s", self.what, self.attempts, error)
        return self.backoff.next()

    def ok(self) -> None:
        if self.since is not None:
            self.logger.info("%s: recovered after %d failed attempts in %s", self.what, self.attempts,
                             _duration(self.clock() - self.since))
            self.since, self.attempts = None, 0
        self.backoff.reset()

    def pause(self, error: object) -> None:
        """failed(error), then the backoff's delay; raises Stopped if `stop` is set by then."""
        if self.stop.wait(self.failed(error)):
            raise Stopped

    def call(self, fn: Callable[[], T], errors: tuple[type[Exception], ...] = (Exception,)) -> T:
        """fn()'s result, once it stops raising one of `errors`; raises Stopped if `stop` is set first."""
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                result = fn()
            except errors as e:
                self.pause(e)
                continue
            self.ok()
            return result


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it wraps (causes, contexts, urllib3's `reason`, exceptions among its args)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        inner = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        todo += [x for x in inner if isinstance(x, BaseException)]


def network_cause(exc: BaseException) -> str | None:
    """Why a server could not be reached, in a few words ("connection refused", "no answer in time"), from the
    exceptions an HTTP client (urllib3, requests) wraps around the socket's; None if `exc` is not about reaching it."""
    chain = list(_chain(exc))
    names = {type(e).__name__ for e in chain}
    if "ReadTimeoutError" in names or "ReadTimeout" in names:  # urllib3's, requests'
        return "no answer in time"
    if "ConnectTimeoutError" in names or "ConnectTimeout" in names:
        return "connect timed out"
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS: {e.verify_message}"
        if isinstance(e, ssl.SSLError):
            return f"TLS: {e.reason or e}"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the name: {e.strerror}"
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno).lower()
    for e in chain:
        if type(e).__name__ == "RemoteDisconnected":
            return "closed the connection without an answer"
        if isinstance(e, TimeoutError):
            return "timed out"
        if isinstance(e, ConnectionError):
            return "connection lost"
    if names & {"ProtocolError", "ChunkedEncodingError", "IncompleteRead"}:  # urllib3's, requests', http.client's
        return "the connection closed mid-answer"
    return None
