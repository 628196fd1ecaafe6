"""How `weftd run` stops: on one SIGTERM or SIGINT, within about GRACE seconds, whatever it is doing.

The work runs on a thread of its own; the main thread only waits for a signal or for the work to end. A signal sets
the one stop event that every wait and retry of the work watches, and the work then has GRACE seconds to return.
What can outlast that is a call to a store or API server that accepted the connection and does not answer (or a
round of kernel changes at thousands of peers): weftd exits without waiting for it, as it would after SIGKILL. The
kernel state is left as it is either way; the next start converges it.

The signal handlers do nothing but let the signal wake the main thread (through the wakeup fd): a handler runs in
the main thread between two bytecodes, and one that set an Event could deadlock on a lock the main thread holds.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from collections.abc import Callable
from types import FrameType

from weftd.retry import Stopped

log = logging.getLogger("weftd")
GRACE = 1.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _wake(signum: int, frame: FrameType | None) -> None:
    pass  # the byte the interpreter writes to the wakeup fd is what wakes the main thread


def run(work: Callable[[threading.Event], int], grace: float = GRACE) -> int:
    """Runs `work(stop)` until it returns or a signal comes; returns its exit code (0 when stopped: also when it
    raised Stopped), or raises what it raised. Call it from the main thread, and end the process with os._exit
    after it: threads of the work may still be inside calls, and the interpreter's finalization beside them can
    crash the process. The handlers stay installed."""
    stop = threading.Event()
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    outcome: list[int | BaseException] = []

    def target() -> None:
        try:
            outcome.append(work(stop))
        except Stopped:
            log.info("stopped before this node was ready")
            outcome.append(0)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            outcome.append(e)
        finally:
            os.write(wfd, b"\0")

    for sig in SIGNALS:
        signal.signal(sig, _wake)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    worker = threading.Thread(target=target, name="weftd", daemon=True)
    worker.start()
    select.select([rfd], [], [])
    for signum in os.read(rfd, 64):
        if signum:
            log.info("%s: stopping", signal.Signals(signum).name)
            break
    stop.set()
    worker.join(grace)
    if worker.is_alive():
        log.info("still busy %.1f s after the stop signal: exiting without waiting for it", grace)
        return 0
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result
