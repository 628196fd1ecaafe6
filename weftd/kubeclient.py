"""The Kubernetes API client that the kube store and the kube policy source share.

Credentials come from a kubeconfig or the pod's service account. The client itself never retries (urllib3 would
retry at once and log a warning per attempt): weftd retries with backoff (weftd.retry). Every call has a timeout,
and a failure reads as one short line naming the API server. `reflect_raw` is the list-then-watch loop that keeps a
cache of one kind of object, as client-go's reflector does.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from weftd.config import ConfigError
from weftd.retry import Retry, Stopped, network_cause

log = logging.getLogger("weftd")
CONNECT_TIMEOUT = 5.0
TIMEOUT = (CONNECT_TIMEOUT, 30.0)  # (connect, read) seconds, for every call but a watch
WATCH_TIMEOUT = 300  # the server ends a watch after this long; the client waits 30 s more for its bytes
GONE = 410


def load(kubeconfig: str | None) -> Any:
    """An ApiClient with the kubeconfig's credentials, or the pod's service account's in a cluster (no
    --kubeconfig). Raises ConfigError."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except Exception as e:  # noqa: BLE001 - ConfigException, OSError, YAML errors: no usable credentials
        where = f"from --kubeconfig {kubeconfig}" if kubeconfig else "(no --kubeconfig given, and not in a cluster)"
        said = " ".join(str(e).split())  # a YAML error spans lines
        raise ConfigError(f"kube credentials {where}: {type(e).__name__}: {said}") from None
    cfg.retries = False
    return client.ApiClient(cfg)


def server(api: Any) -> str:
    """The API server's address, as an API object (CoreV1Api, ...) reaches it."""
    cfg = getattr(getattr(api, "api_client", None), "configuration", None)
    return str(getattr(cfg, "host", None) or "(unknown address)")


def describe(address: str, e: Exception) -> str:
    """One short line on why a call to the API server at `address` failed."""
    from kubernetes.client import ApiException

    if isinstance(e, ApiException) and e.status:
        return f"API server {address} answered {e.status} {e.reason}"
    cause = network_cause(e)
    if cause is not None:
        return f"API server {address} unreachable: {cause}"
    return f"API server {address}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


PAGE = 500  # objects per list request: a large cluster's list comes in pages, each parsed before the next


class Expired(Exception):
    """The watch's resourceVersion is too old (an ERROR event with code 410): list again."""


def _lines(resp: Any) -> Iterator[bytes]:
    """The lines of a streamed response, each as soon as its end arrives."""
    pending = b""
    for chunk in resp.stream(None, decode_content=False):
        pending += chunk
        if b"\n" in pending:
            *lines, pending = pending.split(b"\n")
            yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def reflect_raw(what: str, lister: Callable[..., Any], replace: Callable[[Iterator[dict[str, Any]]], None],
                apply: Callable[[str, dict[str, Any]], None], stop: threading.Event) -> None:
    """Keeps one kind's cache filled until `stop` is set: lists it, then watches from the list's resourceVersion.
    A watch that ends or fails resumes from the last version seen (bookmarks included); a 410 Gone, for a list's
    continue token or a watch's resourceVersion, lists again from the start. Failures are retried with backoff
    (weftd.retry), and the cache keeps what it had meanwhile. `lister`: the API's list call, e.g.
    CoreV1Api.list_node, called for the API's JSON as dicts, not the client's models (which take far longer to
    build and hold every field).

    `replace` gets the list's items as they are read, page by page (PAGE objects per request); an item read is
    not kept here, so a caller that keeps only what it needs holds one page of raw objects at a time. If a page
    fails, the iterator raises in `replace`, and the list starts again later. `apply` gets each watch event's
    type (ADDED, MODIFIED, DELETED) and object."""
    from kubernetes.client import ApiException

    address = server(getattr(lister, "__self__", None))
    retry = Retry(what, stop)
    version: str | None = None  # None: list first

    def listed() -> Iterator[dict[str, Any]]:
        nonlocal version
        token: str | None = None
        while True:
            resp = lister(limit=PAGE, _continue=token, _preload_content=False, _request_timeout=TIMEOUT)
            body = json.loads(resp.data)
            meta = body.get("metadata") or {}
            items = body.get("items") or []
            del body
            yield from items
            token = meta.get("continue")
            if not token:
                version = meta["resourceVersion"]
                return

    try:
        while not stop.is_set():
            try:
                if version is None:
                    replace(listed())
                    retry.ok()
                resp = lister(watch=True, resource_version=version, allow_watch_bookmarks=True,
                              timeout_seconds=WATCH_TIMEOUT, _preload_content=False,
                              _request_timeout=(CONNECT_TIMEOUT, WATCH_TIMEOUT + 30.0))
                retry.ok()  # the server is back as soon as it answers the watch, events or not
                try:
                    for line in _lines(resp):
                        ev = json.loads(line)
                        kind, obj = ev.get("type"), ev.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == GONE:
                                raise Expired(obj.get("message", ""))
                            raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                        if kind != "BOOKMARK":
                            apply(kind, obj)
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if stop.is_set():
                            break
                finally:
                    resp.close()  # a watch left midway cannot go back to the pool as it is
                    resp.release_conn()
            except Expired as e:
                log.info("%s: resourceVersion %s is gone (410: %s): listing again", what, version, e)
                version = None
            except ApiException as e:
                if e.status == GONE:
                    if version is None:
                        log.info("%s: the list's continue token expired (410): listing again from the start", what)
                    else:
                        log.info("%s: resourceVersion %s is gone (410): listing again", what, version)
                    version = None
                    continue
                retry.pause(describe(address, e))
            except Exception as e:  # noqa: BLE001 - the server is unreachable: resume from `version`
                retry.pause(describe(address, e))
    except Stopped:
        pass
