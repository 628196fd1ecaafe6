"""The kube source: Pods, Namespaces and NetworkPolicies watched through the API server.

Each kind is listed once, in pages, then watched from the list's resourceVersion; only a 410 (the
version is gone) lists again, and any other failure resumes the watch after a backoff while the last
known objects stay in force (weftd.kubeclient.reflect_raw). The API's JSON is parsed straight into
the model's objects, which keep only what policy uses: a raw object lives until it is parsed. The
first poll() blocks until all three kinds have been listed, so weftd never replaces the node's policy
tables with a partial view. API calls made here, and so the RBAC they need: pods, namespaces and
networkpolicies list and watch (API_CALLS).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from weftd import kubeclient
from weftd.policy import model
from weftd.policy.model import Key, Object
from weftd.retry import Stopped, wait_either

log = logging.getLogger("weftd.policy")
API_CALLS = (("pods", "list"), ("pods", "watch"), ("namespaces", "list"), ("namespaces", "watch"),
             ("networkpolicies", "list"), ("networkpolicies", "watch"))


class KubeSource:
    def __init__(self, kubeconfig: str | None = None, core: Any = None, networking: Any = None,
                 stop: threading.Event | None = None) -> None:
        """`stop`: weftd's stop event, which ends the watches and the first poll's wait (default: close())."""
        if core is None or networking is None:
            from kubernetes import client

            api = kubeclient.load(kubeconfig)
            core, networking = client.CoreV1Api(api), client.NetworkingV1Api(api)
        self.kinds: dict[str, Callable[..., Any]] = {
            "Pod": core.list_pod_for_all_namespaces,
            "Namespace": core.list_namespace,
            "NetworkPolicy": networking.list_network_policy_for_all_namespaces,
        }
        self._objects: dict[str, dict[Key, Object]] = {k: {} for k in self.kinds}  # as the watches know them
        self._live: dict[Key, Object] = {}  # what objects() shows: the watches' state as of the last poll()
        self._dirty: set[Key] = set()  # keys the watches changed since the last poll()
        self._wake = threading.Event()  # set with _dirty
        self._errors: dict[Key, str] = {}
        self._synced = {k: threading.Event() for k in self.kinds}
        self._lock = threading.Lock()
        self._stop = stop or threading.Event()
        self._threads: list[threading.Thread] = []

    def _parse(self, kind: str, raw: dict[str, Any]) -> tuple[Key | None, Object | None]:
        raw["kind"] = kind  # list items lack it
        raw.pop("apiVersion", None)  # the kind decides
        key = model.object_key(raw)
        try:
            obj = model.parse(raw)
        except model.ObjectError as e:
            with self._lock:
                kept = key is not None and key in self._objects[kind]
                if key is not None and self._errors.get(key) != str(e):
                    log.error("%s%s", e, "; keeping its previous version" if kept else "; ignored")
                    self._errors[key] = str(e)
            return key, None
        with self._lock:
            self._errors.pop(obj.key, None)
        return obj.key, obj

    def _replace(self, kind: str, items: Iterator[dict[str, Any]]) -> None:
        """A list's items, read page by page; each raw object is dropped once parsed."""
        fresh: dict[Key, Object] = {}
        listed: set[Key] = set()
        old = self._objects[kind]  # only this kind's thread replaces it
        for raw in items:
            key, obj = self._parse(kind, raw)
            if key is not None:
                listed.add(key)
            if obj is not None:
                fresh[obj.key] = obj
            elif key is not None and key in old:
                fresh[key] = old[key]
        with self._lock:
            self._objects[kind] = fresh
            self._dirty.update(k for k in old.keys() | fresh.keys() if old.get(k) != fresh.get(k))
            self._errors = {k: v for k, v in self._errors.items() if k[0] != kind or k in listed}
            if self._dirty:
                self._wake.set()
        self._synced[kind].set()

    def _event(self, kind: str, event_type: str, raw: dict[str, Any]) -> None:
        key, obj = self._parse(kind, raw)
        with self._lock:
            if event_type == "DELETED":
                if key is not None:
                    if self._objects[kind].pop(key, None) is not None:
                        self._dirty.add(key)
                    self._errors.pop(key, None)
            elif obj is not None and self._objects[kind].get(obj.key) != obj:
                self._objects[kind][obj.key] = obj
                self._dirty.add(obj.key)
            if self._dirty:
                self._wake.set()

    def _watch(self, kind: str) -> None:
        kubeclient.reflect_raw(f"{kind} list/watch", self.kinds[kind], functools.partial(self._replace, kind),
                               functools.partial(self._event, kind), self._stop)

    def poll(self) -> set[Key]:
        """Takes in what the watches saw since the last poll: returns the keys added, changed or removed. The first
        poll waits for every kind's list (raises Stopped if weftd stops first)."""
        if not self._threads:
            for kind in self.kinds:
                t = threading.Thread(target=self._watch, args=(kind,), name=f"kube-{kind}", daemon=True)
                t.start()
                self._threads.append(t)
            warned = False
            for kind, synced in self._synced.items():
                while not wait_either(synced, self._stop, 5):
                    if self._stop.is_set():
                        raise Stopped
                    if not warned:
                        log.warning("waiting for the API server's first list of %s objects; the policy tables stay "
                                    "as they are", kind)
                        warned = True
        with self._lock:
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            for key in dirty:
                obj = self._objects[key[0]].get(key)
                if obj is None:
                    self._live.pop(key, None)
                else:
                    self._live[key] = obj
        return dirty

    def objects(self) -> Mapping[Key, Object]:
        return self._live

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)

    def error_count(self) -> int:
        with self._lock:
            return len(self._errors)

    def close(self) -> None:
        self._stop.set()
