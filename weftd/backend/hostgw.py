"""host-gw: one route per peer subnet, via the peer's underlay address. Peers must be on-link."""

from __future__ import annotations

from weftd.backend import Backend, BackendConfig, log, register
from weftd.backend.sync import Stats, sync_routes
from weftd.lease import Attrs, Lease


@register
class HostGW(Backend[BackendConfig]):
    type = "host-gw"
    _reported: frozenset[str] | set[str] = frozenset()

    def attrs(self) -> Attrs:
        return Attrs(self.underlay.ip, self.type, public_ipv6=self.underlay.ip6)

    def mtu(self) -> int:
        return self.cfg.mtu or self.underlay.mtu

    def reconcile(self, own: Lease, peers: list[Lease]) -> Stats:
        stats = Stats(peers=len(peers))
        routes = self.hostgw_routes(peers, stats)
        if set(stats.unreachable) != self._reported:  # say it when it changes, not every round
            self._reported = set(stats.unreachable)
            for node in stats.unreachable:
                log.error("host-gw: peer %s is not on-link from %s; it cannot be reached without an overlay "
                          "(use the vxlan backend, or vxlan with DirectRouting)", node, self.underlay.ifname)
        sync_routes(routes, stats)
        return stats
