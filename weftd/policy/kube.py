"""The kube source: Pods, Namespaces and NetworkPolicies watched through the API server.

Each kind is listed once, then watched from the list's resourceVersion; only a 410 (the version is
gone) lists again, and any other failure resumes the watch after a second while the last known
objects stay in force. The first poll() blocks until all three kinds have been listed, so weftd never
replaces the node's policy tables with a partial view. API calls made here, and so the RBAC they
need: pods, namespaces and networkpolicies list and watch (API_CALLS).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from weftd.policy import model
from weftd.policy.model import Key, Object

log = logging.getLogger("weftd.policy")
GONE = 410
WATCH_TIMEOUT = 300
API_CALLS = (("pods", "list"), ("pods", "watch"), ("namespaces", "list"), ("namespaces", "watch"),
             ("networkpolicies", "list"), ("networkpolicies", "watch"))


class KubeSource:
    def __init__(self, kubeconfig: str | None = None, core: Any = None, networking: Any = None) -> None:
        if core is None or networking is None:
            import os

            from kubernetes import client, config

            if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
                config.load_incluster_config()
            else:
                config.load_kube_config(config_file=kubeconfig)
            core, networking = client.CoreV1Api(), client.NetworkingV1Api()
        self.core = core
        self.kinds: dict[str, Callable[..., Any]] = {
            "Pod": core.list_pod_for_all_namespaces,
            "Namespace": core.list_namespace,
            "NetworkPolicy": networking.list_network_policy_for_all_namespaces,
        }
        self._objects: dict[str, dict[Key, Object]] = {k: {} for k in self.kinds}
        self._errors: dict[Key, str] = {}
        self._synced = {k: threading.Event() for k in self.kinds}
        self._lock = threading.Lock()
        self._changed = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _dict(self, obj: Any) -> dict[str, Any]:
        return obj if isinstance(obj, dict) else self.core.api_client.sanitize_for_serialization(obj)

    def _parse(self, kind: str, raw: Any) -> tuple[Key | None, Object | None]:
        d = {**self._dict(raw), "kind": kind}  # list items and watch objects may lack it
        d.pop("apiVersion", None)  # the client's model fills it per group: the kind decides here
        key = model.object_key(d)
        try:
            obj = model.parse(d)
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

    def _replace(self, kind: str, items: list[Any]) -> None:
        fresh: dict[Key, Object] = {}
        for raw in items:
            key, obj = self._parse(kind, raw)
            if obj is not None:
                fresh[obj.key] = obj
            elif key is not None and key in self._objects[kind]:
                fresh[key] = self._objects[kind][key]
        with self._lock:
            self._objects[kind] = fresh
            listed = {model.object_key({**self._dict(r), "kind": kind}) for r in items}
            self._errors = {k: v for k, v in self._errors.items() if k[0] != kind or k in listed}
            self._changed = True
        self._synced[kind].set()

    def _event(self, kind: str, event_type: str, raw: Any) -> None:
        key, obj = self._parse(kind, raw)
        with self._lock:
            if event_type == "DELETED":
                if key is not None:
                    self._objects[kind].pop(key, None)
                    self._errors.pop(key, None)
            elif obj is not None:
                self._objects[kind][obj.key] = obj
            self._changed = True

    def _watch(self, kind: str) -> None:
        from kubernetes import watch
        from kubernetes.client import ApiException

        lister = self.kinds[kind]
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = lister()
                    self._replace(kind, listed.items)
                    version = listed.metadata.resource_version
                w = watch.Watch()
                for ev in w.stream(lister, resource_version=version, timeout_seconds=WATCH_TIMEOUT):
                    self._event(kind, ev["type"], ev["object"])
                    version = w.resource_version
                    if self._stop.is_set():
                        w.stop()
            except ApiException as e:
                if e.status == GONE:
                    log.info("kube %s watch: resourceVersion %s is gone (410): listing again", kind, version)
                    version = None
                    continue
                log.warning("kube %s watch: %s %s", kind, e.status, e.reason)
                self._stop.wait(1.0)
            except Exception as e:  # noqa: BLE001 - the server is unreachable: resume from `version`
                log.warning("kube %s watch: %s: %s", kind, type(e).__name__, e)
                self._stop.wait(1.0)

    def poll(self) -> bool:
        """True if anything changed since the last poll; the first poll waits for every kind's list."""
        if not self._threads:
            for kind in self.kinds:
                t = threading.Thread(target=self._watch, args=(kind,), name=f"kube-{kind}", daemon=True)
                t.start()
                self._threads.append(t)
            for kind, synced in self._synced.items():
                while not synced.wait(5) and not self._stop.is_set():
                    log.warning("waiting for the API server to list %ss; the policy tables stay as they are",
                                kind)
        with self._lock:
            changed, self._changed = self._changed, False
        return changed

    def objects(self) -> dict[Key, Object]:
        with self._lock:
            return {k: o for objs in self._objects.values() for k, o in objs.items()}

    def error_count(self) -> int:
        with self._lock:
            return len(self._errors)

    def close(self) -> None:
        self._stop.set()
