"""The file source follows its directory by inotify: a change is taken in as soon as its writer is done, a
file written in place is never read half-written, and without inotify the directory is listed instead."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from weftd.policy import model, source
from weftd.policy.source import DirSource

NS = "kind: Namespace\nmetadata: {name: x, labels: {v: '%s'}}\n"
POL = "---\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}}\n"
NS_KEY, POL_KEY = ("Namespace", "", "x"), ("NetworkPolicy", "x", "p")


def label(src: DirSource) -> str:
    ns = src.objects()[NS_KEY]
    assert isinstance(ns, model.Namespace)
    return ns.labels["v"]


def waited(src: DirSource, change: threading.Thread, timeout: float = 20.0) -> float:
    """Seconds wait() took to return once `change` ran beside it."""
    t = time.monotonic()
    change.start()
    src.wait(timeout)
    took = time.monotonic() - t
    change.join()
    return took


def later(fn: object, delay: float = 0.2) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fn()  # type: ignore[operator]
    return threading.Thread(target=run)


def test_a_change_wakes_wait_at_once(tmp_path: Path) -> None:
    src = DirSource(tmp_path)
    assert src.poll() == set()
    f = tmp_path / "a.yaml"
    # wait() would sleep 20 s without the inotify wake-up.
    assert waited(src, later(lambda: f.write_text(NS % 1 + POL))) < 10
    assert src.poll() == {NS_KEY, POL_KEY} and label(src) == "1"
    assert waited(src, later(f.unlink)) < 10
    assert src.poll() == {NS_KEY, POL_KEY} and not src.objects()
    src.close()


def test_a_file_written_in_place_is_read_only_once_it_is_closed(tmp_path: Path) -> None:
    src = DirSource(tmp_path)
    f = tmp_path / "a.yaml"
    f.write_text(NS % 1 + POL)
    assert src.poll() == {NS_KEY, POL_KEY}
    with open(f, "r+") as w:
        w.truncate(0)
        w.write(NS % 2)  # a whole YAML document on its own: read now, it would drop the policy
        w.flush()
        for _ in range(5):
            src.wait(0.2)
            assert src.poll() == set()
            assert POL_KEY in src.objects() and label(src) == "1"
        w.write(POL)
    src.wait(10)
    assert src.poll() == {NS_KEY} and label(src) == "2" and POL_KEY in src.objects()
    src.close()


def test_a_file_created_and_written_slowly_is_read_once_it_is_closed(tmp_path: Path) -> None:
    src = DirSource(tmp_path)
    assert src.poll() == set()
    f = tmp_path / "a.yaml"
    with open(f, "w") as w:
        src.wait(0.2)
        assert src.poll() == set() and src.error_count() == 0  # created, empty: not read
        w.write(NS % 1)
        w.flush()
        src.wait(0.2)
        assert src.poll() == set()
        w.write(POL)
    src.wait(10)
    assert src.poll() == {NS_KEY, POL_KEY}
    src.close()


def test_rename_into_place(tmp_path: Path) -> None:
    src = DirSource(tmp_path)
    f = tmp_path / "a.yaml"
    f.write_text(NS % 1)
    assert src.poll() == {NS_KEY}
    tmp = tmp_path / ".a.yaml.tmp"
    with open(tmp, "w") as w:
        w.write(NS % 2)
        w.flush()
        src.wait(0.2)
        assert src.poll() == set()  # dot files are not read
        w.write(POL)
    assert waited(src, later(lambda: os.rename(tmp, f))) < 10
    assert src.poll() == {NS_KEY, POL_KEY} and label(src) == "2"
    src.close()


def test_a_same_size_rewrite_at_once_is_seen(tmp_path: Path) -> None:
    src = DirSource(tmp_path)
    f = tmp_path / "a.yaml"
    f.write_text(NS % 1)
    assert src.poll() == {NS_KEY}
    st = f.stat()
    f.write_text(NS % 2)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and mtime: only the close tells
    assert src.poll() == {NS_KEY} and label(src) == "2"
    src.close()


def test_the_directory_made_later_is_watched(tmp_path: Path) -> None:
    d = tmp_path / "policies"
    src = DirSource(d)
    assert src.poll() == set()
    d.mkdir()
    src.poll()  # watched from now on
    assert waited(src, later(lambda: (d / "a.yaml").write_text(NS % 1))) < 10
    assert src.poll() == {NS_KEY}
    src.close()


def test_without_inotify_the_directory_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    def refused() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(source, "Inotify", refused)
    with caplog.at_level(logging.WARNING, "weftd.policy"):
        src = DirSource(tmp_path)
    assert [r.message for r in caplog.records] == [
        f"inotify is unavailable ([Errno 24] Too many open files): {tmp_path} is listed every 0.5 s instead"]
    f = tmp_path / "a.yaml"
    f.write_text(NS % 1)
    t = time.monotonic()
    src.wait(30)
    assert time.monotonic() - t < 10  # sleeps one listing's interval, not the timeout
    assert src.poll() == {NS_KEY}
    f.write_text(NS % 22)
    assert src.poll() == {NS_KEY} and label(src) == "22"


def test_a_change_is_taken_in_without_listing_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Followed by inotify, a poll looks at the files events named, not at every file: a pod's change costs
    the same with 10 files as with 10,000. Later files by name win, also when one is removed."""
    for i in range(10):
        (tmp_path / f"n{i}.yaml").write_text(NS.replace("name: x", f"name: x{i}") % i)
    src = DirSource(tmp_path)
    assert len(src.poll()) == 10
    monkeypatch.setattr(src, "_listing", lambda: pytest.fail("the directory was listed for one file's change"))
    (tmp_path / "z.yaml").write_text(NS % "z")
    (tmp_path / "a.yaml").write_text(NS % "a")
    src.wait(10)
    assert src.poll() == {NS_KEY} and label(src) == "z"
    (tmp_path / "z.yaml").unlink()
    src.wait(10)
    assert src.poll() == {NS_KEY} and label(src) == "a"
    (tmp_path / "n3.yaml").unlink()
    src.wait(10)
    assert src.poll() == {("Namespace", "", "x3")} and len(src.objects()) == 10
    src.close()
