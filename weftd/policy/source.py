"""The file source: Namespace, Pod and NetworkPolicy objects from *.yaml, *.yml and *.json in a directory.

A file holds one object, several (multi-document YAML), or a `kind: List`. Bad input changes nothing:
a file that does not parse keeps contributing what it last held, and an object that fails validation
keeps its last good version (or is absent if it never had one). Every problem is logged once, naming
the file and the object.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weftd.policy import model
from weftd.policy.model import Key, Object
from weftlib.kernel.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
)

log = logging.getLogger("weftd.policy")
SUFFIXES = (".yaml", ".yml", ".json")
POLL = 0.5  # without inotify: how often the directory is listed
WATCHED = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
           | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)


@dataclass
class FileState:
    stamp: tuple[int, int, int, int]  # mtime_ns, ctime_ns, size, inode
    objects: dict[Key, Object] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _documents(path: Path, text: str) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(text)]
    return list(yaml.safe_load_all(text))


def parse_file(path: Path, text: str, last_good: dict[Key, Object]) -> tuple[dict[Key, Object], list[str]]:
    """Objects of one file, and the problems found (messages name file and object).

    Raises ValueError if the file as a whole cannot be read."""
    objects: dict[Key, Object] = {}
    errors: list[str] = []
    try:
        docs = _documents(path, text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    for doc in docs:
        try:
            items = list(model.expand(doc))
        except model.ObjectError as e:
            errors.append(f"{path}: {e}")
            continue
        for raw in items:
            try:
                obj = model.parse(raw)
            except model.ObjectError as e:
                key = model.object_key(raw)
                kept = key is not None and key in last_good
                errors.append(f"{path}: {e}" + ("; keeping its previous version" if kept else "; ignored"))
                if kept and key is not None:
                    objects[key] = last_good[key]
                continue
            if obj.key in objects:
                errors.append(f"{path}: {model.describe(obj.key)} appears twice; the later one is used")
            objects[obj.key] = obj
    return objects, errors


Stamp = tuple[int, int, int, int]  # mtime_ns, ctime_ns, size, inode


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class DirSource:
    """The directory's files, followed by inotify: a file is read once its writer has closed it or it was
    renamed into place, never while a writer that writes in place has it open, and a read during which
    the file changed is thrown away and done again. Without inotify, the directory is listed at every
    poll and a file is read when its stamp changed."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.files: dict[Path, FileState] = {}
        self._objects: dict[Key, Object] = {}  # every file's objects, a later file's (by name) over an earlier one's
        self._inotify: Inotify | None = None
        self._wd: int | None = None  # the watch on the directory; None while it is missing
        self._writing: set[str] = set()  # names modified in place and not closed since: not read until they are
        self._named: set[str] = set()  # names to read again whatever their stamp says (closed or renamed in)
        self._seen: set[str] = set()  # names with an event since they were last read
        self._dirty: set[str] = set()  # names to look at again at the next poll (its cost: theirs, not the dir's)
        self._holders: dict[Key, set[Path]] = {}  # the files each object is in
        self._errors = 0  # the problems of every file, kept as files change
        self._rescan = True  # the whole directory is listed at the next poll
        try:
            self._inotify = Inotify()
        except OSError as e:
            log.warning("inotify is unavailable (%s): %s is listed every %.1f s instead", e, directory, POLL)

    # ---- inotify ----

    def _watch(self) -> None:
        """Watches the directory if it is there and not watched yet (before it is listed: no change is missed)."""
        if self._inotify is None or self._wd is not None:
            return
        try:
            self._wd = self._inotify.watch(str(self.dir), WATCHED)
        except FileNotFoundError:
            return  # listed again at each poll until it appears
        except OSError as e:
            log.warning("inotify cannot watch %s (%s): it is listed every %.1f s instead", self.dir, e, POLL)
            self._inotify.close()
            self._inotify = None
            return
        log.info("%s is followed by inotify", self.dir)
        self._rescan = True

    def _drain(self) -> None:
        """Takes in the events queued so far."""
        if self._inotify is None:
            return
        for ev in self._inotify.read():
            if ev.mask & IN_Q_OVERFLOW:
                log.warning("inotify dropped events for %s; listing it again", self.dir)
                self._writing.clear()
                self._rescan = True
                continue
            if ev.wd != self._wd:
                continue  # a watch already removed
            if ev.mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                self._inotify.unwatch(ev.wd)
                self._wd = None  # watched again (or found missing) at the next poll
                self._writing.clear()
                self._rescan = True
                continue
            name = ev.name
            self._seen.add(name)
            if ev.mask & IN_MODIFY:
                self._writing.add(name)
                continue
            if ev.mask & IN_CREATE and not ev.mask & IN_ISDIR and self._created_empty(name):
                self._writing.add(name)  # open(O_CREAT): its writer's close tells when it is whole
                continue
            if ev.mask & IN_ATTRIB:
                self._dirty.add(name)  # read if its stamp changed, unless a writer still has it open
                continue
            self._writing.discard(name)
            self._named.add(name)
            self._dirty.add(name)

    def _created_empty(self, name: str) -> bool:
        """A regular file with one link: made by open(O_CREAT), not link(2), so a close is coming."""
        try:
            st = os.lstat(self.dir / name)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_nlink == 1

    # ---- reading ----

    def _listing(self) -> dict[Path, Stamp]:
        out = {}
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return {}
        for e in entries:
            if not e.name.endswith(SUFFIXES) or e.name.startswith("."):
                continue
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            if e.is_file():
                out[Path(e.path)] = _stamp(st)
        return out

    def _look(self, names: set[str]) -> dict[Path, Stamp | None]:
        """The stamps of the named files (None: gone or not a policy file)."""
        out: dict[Path, Stamp | None] = {}
        for name in names:
            path = self.dir / name
            if not name.endswith(SUFFIXES) or name.startswith("."):
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                out[path] = None
                continue
            out[path] = _stamp(st) if stat.S_ISREG(st.st_mode) else None
        return out

    def _read(self, path: Path) -> tuple[Stamp, str] | None:
        """The file's stamp and text, or None if it changed while it was read. Raises OSError, ValueError."""
        self._seen.discard(path.name)
        with open(path, "rb") as f:
            before = _stamp(os.fstat(f.fileno()))
            data = f.read()
            after = _stamp(os.fstat(f.fileno()))
        self._drain()
        if before != after or path.name in self._seen:
            return None
        return before, data.decode()

    def poll(self) -> set[Key]:
        """Re-reads the files that changed; returns the keys whose object was added, changed or removed.
        Followed by inotify, only the files named by events are looked at; the whole directory is listed
        at the start, after inotify dropped events, and at every poll without inotify."""
        self._watch()
        self._drain()
        named, self._named = self._named, set()
        if self._inotify is not None and self._wd is not None and not self._rescan:
            names, self._dirty = self._dirty, set()
            found = self._look(names)
        else:
            self._rescan = False
            self._dirty.clear()
            listing: dict[Path, Stamp | None] = dict(self._listing())
            found = {path: None for path in self.files if path not in listing}
            found.update(listing)
        touched: set[Key] = set()
        for path, stamp in sorted(found.items()):
            if stamp is None:
                if path in self.files:
                    touched.update(self._set(path, None))
                    log.info("%s removed", path)
                continue
            old = self.files.get(path)
            if old is not None and old.stamp == stamp and path.name not in named:
                continue
            if path.name in self._writing:
                continue  # read when its writer closes it
            previous = old.objects if old is not None else {}
            try:
                read = self._read(path)
                if read is None:  # changed while it was read: again at the next poll, which wait() does not delay
                    self._named.add(path.name)
                    self._dirty.add(path.name)
                    if self._inotify is None or self._wd is None:
                        self._rescan = True
                    continue
                stamp, text = read
                objects, errors = parse_file(path, text, previous)
            except (OSError, ValueError) as e:
                msg = str(e) if str(path) in str(e) else f"{path}: {e}"
                log.error("%s; %s", msg, "keeping what it held before" if previous else "nothing from it is applied")
                touched.update(self._set(path, FileState(stamp, previous, [msg])))
                continue
            for err in errors:
                log.error("%s", err)
            touched.update(self._set(path, FileState(stamp, objects, errors)))
        return self._merge(touched)

    def _set(self, path: Path, state: FileState | None) -> set[Key]:
        """Puts (or, with None, removes) one file's state; returns the keys it held before or holds now."""
        old = self.files.pop(path, None)
        if old is not None:
            self._errors -= len(old.errors)
            for key in old.objects:
                holders = self._holders[key]
                holders.discard(path)
                if not holders:
                    del self._holders[key]
        if state is not None:
            self.files[path] = state
            self._errors += len(state.errors)
            for key in state.objects:
                self._holders.setdefault(key, set()).add(path)
        return set(old.objects if old is not None else ()) | set(state.objects if state is not None else ())

    def _merge(self, keys: set[Key]) -> set[Key]:
        """Brings the merged view up to date for `keys`; returns those whose object changed."""
        changed = set()
        for key in keys:
            holders = self._holders.get(key)
            obj = self.files[max(holders)].objects[key] if holders else None  # the last file by name wins
            old = self._objects.get(key)
            if obj is None:
                if old is not None:
                    del self._objects[key]
                    changed.add(key)
            elif old is None or old != obj:
                self._objects[key] = obj
                changed.add(key)
            if holders is not None and len(holders) > 1:
                log.debug("%s is in more than one file; the last by name is used", model.describe(key))
        return changed

    def objects(self) -> Mapping[Key, Object]:
        return self._objects

    def wait(self, timeout: float) -> None:
        """Until inotify has events (or a read to do again), or `timeout`; without inotify (or the directory),
        sleeps `timeout`, at most POLL."""
        inotify = self._inotify
        if inotify is None or self._wd is None:
            time.sleep(min(timeout, POLL))
        elif not self._rescan and not self._dirty:
            inotify.ready(timeout)

    def error_count(self) -> int:
        return self._errors

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
