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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weftd.policy import model
from weftd.policy.model import Key, Object

log = logging.getLogger("weftd.policy")
SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class FileState:
    stamp: tuple[int, int, int]  # mtime_ns, size, inode
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


class DirSource:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.files: dict[Path, FileState] = {}
        self._objects: dict[Key, Object] = {}  # every file's objects, a later file's (by name) over an earlier one's

    def _listing(self) -> dict[Path, tuple[int, int, int]]:
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
                out[Path(e.path)] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out

    def poll(self) -> set[Key]:
        """Re-reads the files that changed; returns the keys whose object was added, changed or removed."""
        listing = self._listing()
        touched: set[Key] = set()
        for path in list(self.files):
            if path not in listing:
                touched.update(self.files.pop(path).objects)
                log.info("%s removed", path)
        for path, stamp in sorted(listing.items()):
            old = self.files.get(path)
            if old is not None and old.stamp == stamp:
                continue
            previous = old.objects if old is not None else {}
            touched.update(previous)
            try:
                text = path.read_text()
                objects, errors = parse_file(path, text, previous)
            except (OSError, ValueError) as e:
                msg = str(e) if str(path) in str(e) else f"{path}: {e}"
                log.error("%s; %s", msg, "keeping what it held before" if previous else "nothing from it is applied")
                self.files[path] = FileState(stamp, previous, [msg])
                continue
            for err in errors:
                log.error("%s", err)
            self.files[path] = FileState(stamp, objects, errors)
            touched.update(objects)
        return self._merge(touched)

    def _merge(self, keys: set[Key]) -> set[Key]:
        """Brings the merged view up to date for `keys`; returns those whose object changed."""
        changed = set()
        order = [self.files[p].objects for p in sorted(self.files, reverse=True)]  # the last file wins
        for key in keys:
            obj = next((objs[key] for objs in order if key in objs), None)
            old = self._objects.get(key)
            if obj is None:
                if old is not None:
                    del self._objects[key]
                    changed.add(key)
            elif old is None or old != obj:
                self._objects[key] = obj
                changed.add(key)
            if obj is not None and len(order) > 1 and sum(key in objs for objs in order) > 1:
                log.debug("%s is in more than one file; the last by name is used", model.describe(key))
        return changed

    def objects(self) -> Mapping[Key, Object]:
        return self._objects

    def wait(self, timeout: float) -> None:
        time.sleep(timeout)

    def error_count(self) -> int:
        return sum(len(f.errors) for f in self.files.values())
