"""Netlink helpers shared by the plugin and weftd, the mark that says a link is Weft's, and the names of
Weft's links: the node bridge's default, a pod's host end.

pyroute2 is imported only inside the helpers weftd uses: the plugin's path never loads it.

Ownership: every link Weft creates carries the link group GROUP, set in the same
netlink message that creates it. Weft deletes or changes only links with that mark.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyroute2 import IPRoute  # importing the pyroute2 package itself loads all of it (150 ms)

GROUP = 0x77656674  # "weft"
DEFAULT_BRIDGE = "cni0"  # the bridge plugin's default, which weftd's conflist names unless told otherwise


def get_link(ipr: IPRoute, name: str) -> Any:
    """The link called `name`, or None if there is none."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def kind(link: Any) -> str | None:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


def owned(link: Any) -> bool:
    """Whether Weft created `link` (it carries Weft's link group)."""
    return link is not None and link.get("group") == GROUP


def ignore_errno(fn: Any, *argv: Any, codes: tuple[int, ...], **kw: Any) -> None:
    """Calls a pyroute2 method, treating the netlink errors in `codes` as success (idempotence)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        fn(*argv, **kw)
    except NetlinkError as e:
        if e.code not in codes:
            raise


def host_veth_name(container_id: str, ifname: str) -> str:
    """The host end of a pod's veth, named after its owner: DEL, CHECK and GC find it without a result, and
    weftd finds the veth of every reservation."""
    import hashlib  # a few ms of OpenSSL at import: not for VERSION or STATUS

    return "weft" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:8]


def random_mac() -> str:
    """A random unicast, locally administered MAC address."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)
