"""How the batched reconcile reads the kernel's answers: a refused add is an error, never a converged kernel."""

from __future__ import annotations

import errno
import socket
from typing import Any

import netaddr
import pytest

from weftd.backend.errors import BackendError
from weftd.backend.sync import RouteSpec, Stats, sync_fdb, sync_neighbours, sync_routes
from weftlib.kernel.rtnl import NDMSG, attribute

MAC = "02:00:00:00:00:01"


class Kernel:
    """A netlink socket that holds `have` (dump answers) and answers every request of a batch with `code`."""

    def __init__(self, code: int, have: list[bytes] | None = None) -> None:
        self.code = code
        self.have = have or []
        self.sent: list[tuple[int, int, bytes]] = []

    def dump_raw(self, kind: int, body: bytes) -> list[bytes]:
        return self.have

    def batch(self, requests: list[tuple[int, int, bytes]]) -> list[Any]:
        self.sent += requests
        return [self.code] * len(requests)


def neighbour(ifindex: int, ip: str, mac: str) -> bytes:
    return (NDMSG.pack(socket.AF_INET, ifindex, 0x80, 0, 0) + attribute(1, socket.inet_aton(ip))
            + attribute(2, bytes.fromhex(mac.replace(":", ""))))


@pytest.mark.parametrize("code", [errno.ENOENT, errno.ESRCH])
def test_an_add_refused_with_a_delete_errno_is_an_error(code: int) -> None:
    """ENOENT and ESRCH mean "already gone" only for a delete; an add refused with them did not happen."""
    kernel: Any = Kernel(code)
    with pytest.raises(BackendError, match="FDB entry"):
        sync_fdb(7, {MAC: netaddr.IPAddress("192.168.77.11")}, Stats(), kernel)
    with pytest.raises(BackendError, match=r"neighbour 10\.244\.1\.0"):
        sync_neighbours(7, {netaddr.IPAddress("10.244.1.0"): MAC}, (socket.AF_INET,), Stats(), kernel)
    with pytest.raises(BackendError, match=r"route 10\.244\.1\.0/24"):
        route = RouteSpec(netaddr.IPAddress("10.244.1.0"), 7, onlink=True)
        sync_routes({netaddr.IPNetwork("10.244.1.0/24"): route}, Stats(), kernel)


def test_a_delete_of_an_entry_already_gone_is_not_an_error() -> None:
    kernel: Any = Kernel(errno.ENOENT, [neighbour(7, "10.244.9.0", MAC)])
    stats = Stats()
    sync_neighbours(7, {}, (socket.AF_INET,), stats, kernel)
    assert len(kernel.sent) == 1 and stats.changes == 0


def test_changes_made_are_counted() -> None:
    kernel: Any = Kernel(0)
    stats = Stats()
    sync_fdb(7, {MAC: netaddr.IPAddress("192.168.77.11")}, stats, kernel)
    assert stats.changes == 1 and stats.fdb == 1
