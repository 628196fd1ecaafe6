"""Prometheus metrics and the /healthz endpoint."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from weftlib.version import version


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        Gauge("weft_build_info", "1, labelled with the running weftd's version", ["version"],
              registry=r).labels(version=version()).set(1)
        self.peers = Gauge("weft_peers", "Peers known from the store", registry=r)
        self.routes = Gauge("weft_routes", "Routes to peer subnets programmed by weftd", registry=r)
        self.neighbours = Gauge("weft_neighbours", "Permanent neighbour entries on the VTEP", registry=r)
        self.fdb = Gauge("weft_fdb_entries", "FDB entries on the VTEP", registry=r)
        self.unreachable = Gauge("weft_peers_unreachable", "Peers that cannot be routed to (not on-link)",
                                 registry=r)
        self.reconcile = Histogram("weft_reconcile_duration_seconds", "Time of one reconciliation", registry=r,
                                   buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.reconcile_errors = Counter("weft_reconcile_errors_total", "Failed reconciliations", ["stage"],
                                        registry=r)
        self.node_config_repairs = Counter(
            "weft_node_config_repairs_total", "Times weftd wrote its conflist or subnet file again after something "
            "else changed or removed it", ["file"], registry=r)
        self.changes = Counter("weft_kernel_changes_total", "Kernel entries added, fixed or removed", registry=r)
        self.renewals = Counter("weft_lease_renewals_total", "Lease renewals in the store", registry=r)
        self.store_up = Gauge("weft_store_up", "1 if the last read of the store succeeded", registry=r)
        self.wireguard_implementation = Gauge(
            "weft_wireguard_implementation", "1 for the WireGuard implementation in use (kernel or userspace)",
            ["implementation", "device"], registry=r)
        self.wireguard_peers = Gauge("weft_wireguard_peers", "Peers configured on the WireGuard device", registry=r)
        self.wireguard_restarts = Gauge("weft_wireguard_userspace_restarts",
                                        "Times weftd restarted wireguard-go after it died", registry=r)
        self.cni_requests = Counter("weft_cni_requests_total", "CNI invocations handed over by the weft plugin",
                                    ["command", "result"], registry=r)
        self.cni_seconds = Histogram("weft_cni_request_seconds", "Time weftd spent on one handed-over invocation",
                                     ["command"], registry=r,
                                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))


class Health:
    """Ready once the node config is written; healthy while reconciliations keep succeeding."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.ready = False
        self.last_ok = 0.0
        self.reason = "starting"
        self.info: dict[str, str] = {}  # shown under the status, e.g. which WireGuard implementation runs
        self._lock = threading.Lock()

    def ok(self) -> None:
        with self._lock:
            self.last_ok, self.reason = time.monotonic(), ""

    def failed(self, reason: str) -> None:
        with self._lock:
            self.reason = reason

    def status(self) -> tuple[bool, str]:
        with self._lock:
            if not self.ready:
                return False, self.reason or "not ready"
            age = time.monotonic() - self.last_ok
            if age > self.max_age:
                return False, f"no successful reconciliation for {age:.0f}s: {self.reason}"
            return True, "ok"


def serve(addr: tuple[str, int], metrics: Metrics, health: Health) -> ThreadingHTTPServer:
    """Serves /metrics and /healthz on (host, port); host '' for every address."""
    host, port = addr

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, code, ctype = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
            elif self.path in ("/healthz", "/readyz"):
                good, why = health.status()
                lines = [why, *(f"{k}: {v}" for k, v in sorted(health.info.items()))]
                body, code, ctype = "".join(line + "\n" for line in lines).encode(), 200 if good else 503, "text/plain"
            else:
                body, code, ctype = b"not found\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host or "0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
