"""One WireGuard device, whichever implementation provides it: the kernel's (configured over
generic netlink) or wireguard-go's (a TUN device and a control socket)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute

from weftd.backend.errors import BackendError
from weftd.backend.wireguard.peers import DeviceState, PeerOp
from weftlib.kernel.netlink import get_link, owned


class NotSupported(BackendError):
    """This implementation cannot run here (no kernel module, no wireguard-go)."""


def valid_ifname(name: str) -> bool:
    return 0 < len(name.encode()) <= 15 and "/" not in name and not any(c.isspace() for c in name) \
        and name not in (".", "..")


class Device(ABC):
    implementation: str  # "kernel" or "userspace"
    # Called (from another thread) when the device had to be brought back, e.g. a restarted
    # wireguard-go: everything configured on it is gone and must be applied again.
    on_restart: Callable[[], None] | None = None

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname

    def link(self, ipr: IPRoute) -> Any:
        return get_link(ipr, self.ifname)

    def check_owned(self, link: Any) -> None:
        if link is not None and not owned(link):
            raise BackendError(f"{self.ifname} exists and was not created by weft; not touching it "
                               "(choose another name with --wireguard-device)")

    @abstractmethod
    def ensure(self, ipr: IPRoute) -> bool:
        """The device exists and is Weft's; True if it was (re)created now, empty."""

    @abstractmethod
    def state(self) -> DeviceState:
        """What the device holds now."""

    @abstractmethod
    def set(self, private_key: str | None = None, listen_port: int | None = None,
            ops: list[PeerOp] | tuple[PeerOp, ...] = ()) -> None:
        """Applies a key, a port and peer changes."""

    @abstractmethod
    def remove(self, ipr: IPRoute) -> None:
        """Deletes the device (uninstall)."""

    def describe(self) -> str:
        return self.implementation

    def close(self) -> None:  # noqa: B027 - only some implementations hold resources
        pass
