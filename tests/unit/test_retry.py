"""weftd.retry: the backoff schedule and its jitter, the log cadence of a failure (on an injected clock), waits that
end when weftd stops, and the one-line reasons given for a server that cannot be reached."""

from __future__ import annotations

import errno
import logging
import random
import ssl
import threading
import time
from typing import Any

import pytest
import requests
import urllib3
from etcd3gw import exceptions as etcd_exceptions
from kubernetes.client import ApiException

from weftd import kubeclient
from weftd.retry import Backoff, Retry, Stopped, network_cause, wait_either
from weftd.subnet import StoreError
from weftd.subnet.etcd import EtcdStore


def test_backoff_doubles_from_half_a_second_to_a_30_second_cap() -> None:
    b = Backoff(rand=lambda: 0.5)  # the middle of the jitter: no spread
    assert [b.next() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    b.reset()
    assert b.next() == 0.5


def test_backoff_jitter_stays_within_20_percent() -> None:
    low, high = Backoff(rand=lambda: 0.0), Backoff(rand=lambda: 1.0)
    assert [low.next() for _ in range(3)] == pytest.approx([0.4, 0.8, 1.6])
    assert [high.next() for _ in range(3)] == pytest.approx([0.6, 1.2, 2.4])
    rng = random.Random(7)
    b = Backoff(rand=rng.random)
    delays = [b.next() for _ in range(200)]
    bases = [min(30.0, 0.5 * 2**i) for i in range(200)]
    assert all(0.8 * base <= d <= 1.2 * base for d, base in zip(delays, bases, strict=True))
    assert len({round(d, 6) for d in delays[10:]}) > 100, "capped delays are still spread"


def test_backoff_after_very_many_failures_is_the_cap() -> None:
    b = Backoff(rand=lambda: 0.5, failures=100_000)
    assert b.next() == 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def test_a_failure_is_logged_when_it_starts_once_a_minute_and_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.retry")
    clock = Clock()
    r = Retry("reading the network config", threading.Event(), logging.getLogger("test.retry"), clock=clock)
    for _ in range(130):  # one attempt a second for 130 s
        r.failed("etcd http://192.0.2.1:2379 unreachable: connection refused")
        clock.now += 1
    assert lines(caplog) == [
        "reading the network config: etcd http://192.0.2.1:2379 unreachable: connection refused; retrying",
        "reading the network config: still failing after 61 attempts in 60 s: etcd http://192.0.2.1:2379 "
        "unreachable: connection refused",
        "reading the network config: still failing after 121 attempts in 2 min: etcd http://192.0.2.1:2379 "
        "unreachable: connection refused"]
    assert len(lines(caplog, logging.DEBUG)) == 130  # the other attempts at debug level
    caplog.clear()
    r.ok()
    r.ok()
    assert lines(caplog) == ["reading the network config: recovered after 130 failed attempts in 2 min"]
    caplog.clear()
    clock.now += 500
    r.failed("etcd http://192.0.2.1:2379 unreachable: no answer in time")
    assert lines(caplog) == ["reading the network config: etcd http://192.0.2.1:2379 unreachable: no answer in "
                              "time; retrying"]


def test_failed_returns_the_backoff_and_ok_resets_it() -> None:
    r = Retry("x", threading.Event(), backoff=Backoff(rand=lambda: 0.5), clock=Clock())
    assert [r.failed("e") for _ in range(4)] == [0.5, 1, 2, 4]
    r.ok()
    assert r.failed("e") == 0.5


def test_call_retries_until_it_succeeds() -> None:
    results: list[Any] = [OSError("down"), OSError("down"), "up"]

    def attempt() -> str:
        got = results.pop(0)
        if isinstance(got, Exception):
            raise got
        return str(got)

    r = Retry("x", threading.Event(), backoff=Backoff(initial=0.001))
    assert r.call(attempt) == "up"
    assert r.since is None and r.attempts == 0


def test_call_leaves_other_errors_alone() -> None:
    r = Retry("x", threading.Event(), backoff=Backoff(initial=0.001))
    with pytest.raises(KeyError):
        r.call(lambda: {}["k"], (OSError,))


def test_a_stop_ends_a_backoff_wait_at_once() -> None:
    stop = threading.Event()
    r = Retry("x", stop, backoff=Backoff(initial=30))
    threading.Timer(0.1, stop.set).start()
    t = time.monotonic()
    with pytest.raises(Stopped):
        r.call(lambda: (_ for _ in ()).throw(OSError("down")))
    assert time.monotonic() - t < 5  # not the 30 s backoff
    with pytest.raises(Stopped):
        r.call(lambda: "never called")


def test_wait_either() -> None:
    event, stop = threading.Event(), threading.Event()
    assert wait_either(event, stop, 0.05) is False
    threading.Timer(0.05, event.set).start()
    assert wait_either(event, stop, 30) is True
    event.clear()
    threading.Timer(0.05, stop.set).start()
    t = time.monotonic()
    assert wait_either(event, stop, 30) is False
    assert time.monotonic() - t < 5


def raised(make: Any) -> BaseException:
    """The exception `make()` raises, with the context Python gives it."""
    try:
        make()
    except BaseException as e:  # noqa: BLE001 - any is what is wanted
        return e
    raise AssertionError("nothing raised")


def refused() -> urllib3.exceptions.NewConnectionError:
    """What urllib3 (no retries) raises for a refused connection: the socket's error is its cause."""
    def make() -> None:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        except ConnectionRefusedError as e:
            raise urllib3.exceptions.NewConnectionError(
                None, "Failed to establish a new connection: [Errno 111] Connection refused") from e
    e = raised(make)
    assert isinstance(e, urllib3.exceptions.NewConnectionError)
    return e


def test_network_causes() -> None:
    assert network_cause(refused()) == "connection refused"
    # requests wraps urllib3's MaxRetryError, whose `reason` is the connection error; etcd3gw raises its own
    # exception (without a message) while handling that one.
    wrapped = requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/v3/kv/range", refused()))

    def etcd() -> None:
        try:
            raise wrapped
        except requests.exceptions.ConnectionError as e:
            raise etcd_exceptions.ConnectionFailedError(str(e)) from None

    e = raised(etcd)
    assert str(e) == "" and network_cause(e) == "connection refused"
    read = urllib3.exceptions.ReadTimeoutError(None, "/api/v1/nodes/n1", "Read timed out. (read timeout=30)")
    assert network_cause(read) == "no answer in time"
    assert network_cause(urllib3.exceptions.ConnectTimeoutError(None, "timed out")) == "connect timed out"
    assert network_cause(OSError(errno.EHOSTUNREACH, "No route to host")) == "no route to host"
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "self-signed certificate"
    assert network_cause(cert) == "TLS: self-signed certificate"
    assert network_cause(urllib3.exceptions.ProtocolError("Response ended prematurely")) == \
        "the connection closed mid-answer"
    assert network_cause(ValueError("not JSON")) is None


def test_kube_errors_read_as_one_line_naming_the_server() -> None:
    server = "https://10.0.0.1:6443"
    assert kubeclient.describe(server, refused()) == f"API server {server} unreachable: connection refused"
    assert kubeclient.describe(server, ApiException(status=403, reason="Forbidden")) == \
        f"API server {server} answered 403 Forbidden"
    assert kubeclient.describe(server, ValueError("bad\nand more")) == f"API server {server}: ValueError: bad"


def test_etcd_errors_name_the_endpoint() -> None:
    store = EtcdStore("http://192.0.2.1:2379")
    err = store._error("get config", refused())
    assert isinstance(err, StoreError) and str(err) == "etcd http://192.0.2.1:2379 unreachable: connection refused"
    answered = etcd_exceptions.InternalServerError('{"error": "etcdserver: no leader"}', "Internal Server Error")
    assert str(store._error("get config", answered)) == \
        'etcd http://192.0.2.1:2379: get config: InternalServerError: {"error": "etcdserver: no leader"}'
