"""weftd's loop: acquire this node's lease, set up the backend and NAT, write the node config, then
keep the kernel converged to the store's view: on every change, and every `resync` seconds."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute

from weftd import nodeconf
from weftd.backend import Backend
from weftd.config import Paths
from weftd.lease import Lease
from weftd.metrics import Health, Metrics
from weftd.netfilter import Rules
from weftd.retry import Retry, Stopped
from weftd.subnet import StoreError, SubnetStore
from weftlib.kernel import sysctl
from weftlib.kernel.netlink import DEFAULT_BRIDGE

if TYPE_CHECKING:
    from weftd.policy.engine import PolicyEngine

log = logging.getLogger("weftd")


@dataclass(eq=False, repr=False)
class Daemon:
    node: str
    ipr: IPRoute
    store: SubnetStore
    backend: Backend[Any]
    rules: Rules
    paths: Paths
    metrics: Metrics
    health: Health
    resync: float = 10.0
    portmap: bool = True
    bridge: str = DEFAULT_BRIDGE
    policy: PolicyEngine | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # weftd's: every wait and retry ends when set
    own: Lease | None = field(init=False, default=None)
    peers: list[Lease] = field(init=False, default_factory=list)
    announced: bool = field(init=False, default=False)  # the store has been told this node's network is up

    def start(self) -> None:
        """Blocks until the node is ready: lease, backend, NAT, peers programmed, config written. Raises Stopped if
        `stop` is set first."""
        retry = Retry("acquiring this node's lease", self.stop, log)
        while self.own is None:
            try:
                self.own = self.store.acquire(self.node, self.backend.attrs())
            except StoreError as e:
                self.health.failed(str(e))
                retry.pause(e)
        retry.ok()
        log.info("node %s: subnet %s, backend %s, MTU %d", self.node, " ".join(map(str, self.own.subnets)),
                 self.backend.type, self.backend.mtu())
        self.backend.setup(self.own)
        if self.policy is not None:
            # Before any pod of this run can be attached; the previous run's tables stay until then.
            self.policy.start(self.own.subnets)
        # In this node's network namespace: weftd runs in it.
        sysctl.write("/proc/sys/net/ipv4/ip_forward", "1", missing_ok=False)
        if self.store.network.ipv6 is not None:
            sysctl.write("/proc/sys/net/ipv6/conf/all/forwarding", "1", missing_ok=False)
        retry = Retry("programming this node's routes", self.stop, log)
        while (error := self.reconcile()) is not None:
            retry.pause(error)
        retry.ok()
        if self.stop.is_set():
            raise Stopped
        self.publish()
        self.health.ready = True
        log.info("ready: wrote %s and %s", self.paths.subnet_file, self.paths.conflist)

    def publish(self) -> None:
        """The node config, for the bridge and for the runtime: only once the backend is programmed."""
        assert self.own is not None
        nodeconf.fix_bridge(self.ipr, self.bridge, self.store.network, self.own)
        self.write_node_config()

    def write_node_config(self) -> list[Path]:
        assert self.own is not None
        return nodeconf.write(self.paths, self.bridge, self.store.network, self.own, self.backend.mtu(),
                              self.portmap)

    def repair_node_config(self) -> None:
        """The conflist and the subnet file are weftd's: one that something else rewrote (an install
        of the example conflist, say), edited or deleted is written again, as drifted routes are."""
        try:
            repaired = self.write_node_config()
        except OSError as e:
            self.metrics.reconcile_errors.labels("node-config").inc()
            log.error("writing the node config: %s", e)
            return
        for path in repaired:
            self.metrics.node_config_repairs.labels(path.name).inc()
            log.warning("repaired drift: %s did not hold what weftd wrote; wrote it again", path)

    def reconcile(self) -> str | None:
        """One round: the kernel made to match the store. None if it succeeded, else what failed (counted in the
        metrics and health; the caller retries)."""
        assert self.own is not None
        t = time.perf_counter()
        try:
            leases = self.store.leases()
            self.metrics.store_up.set(1)
            self.peers = [le for n, le in sorted(leases.items()) if n != self.node]
            if self.node not in leases:
                log.warning("own lease vanished from the store; publishing it again")
                before = self.own.subnets
                self.own = self.store.acquire(self.node, self.backend.attrs())
                self.announced = False
                if self.own.subnets != before:
                    log.warning("this node's subnets changed from %s to %s", " ".join(map(str, before)),
                                " ".join(map(str, self.own.subnets)))
                    self.backend.setup(self.own)
                    self.publish()
        except StoreError as e:
            # Keep the last good state: routes of live peers are never removed for lack of news.
            self.metrics.store_up.set(0)
            self.metrics.reconcile_errors.labels("store").inc()
            self.health.failed(str(e))
            return f"{e}; keeping the last good state"
        try:
            stats = self.backend.reconcile(self.own, self.peers)
            if self.rules.ensure():
                log.info("netfilter rules restored")
        except Exception as e:  # noqa: BLE001 - count, retry at the next round
            self.metrics.reconcile_errors.labels("kernel").inc()
            self.health.failed(f"kernel: {e}")
            return f"kernel: {e}"
        took = time.perf_counter() - t
        m = self.metrics
        m.reconcile.observe(took)
        m.peers.set(stats.peers)
        m.routes.set(stats.routes)
        m.neighbours.set(stats.neighbours)
        m.fdb.set(stats.fdb)
        m.unreachable.set(len(stats.unreachable))
        m.changes.inc(stats.changes)
        self.backend.observe(m)
        self.health.info = self.backend.info()
        if stats.changes:
            log.info("reconciled %d peers in %.3fs: %d changes", stats.peers, took, stats.changes)
        if not self.announced:
            try:
                self.store.network_ready(self.node)
                self.announced = True
            except StoreError as e:
                log.error("announcing the network is up: %s; retrying", e)
        self.health.ok()
        return None

    def run(self) -> None:
        """start(), then a round at every change of the store and every `resync` seconds (sooner, with backoff,
        after a failed one) until `stop` is set."""
        try:
            self.start()
            rounds = Retry("reconciling", self.stop, log)
            renewals = Retry("renewing the lease", self.stop, log)
            wait = self.resync
            while not self.stop.is_set():
                self.store.wait(wait)
                if self.stop.is_set():
                    break
                try:
                    if self.store.renew():
                        self.metrics.renewals.inc()
                    renewals.ok()
                except StoreError as e:
                    self.metrics.reconcile_errors.labels("renew").inc()
                    renewals.failed(e)
                error = self.reconcile()
                if error is None:
                    rounds.ok()
                    wait = self.resync
                else:
                    wait = min(self.resync, rounds.failed(error))
                self.repair_node_config()
        except Stopped:
            pass
        finally:
            self.store.close()
            self.backend.close()
        log.info("stopped; kernel state left in place so pod traffic keeps flowing")
