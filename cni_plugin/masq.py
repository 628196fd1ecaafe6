"""ipMasq: masquerade a pod's traffic that leaves its subnet, through the node's NAT sets (weftlib.kernel.nat).

Each pod's elements carry an owner tag naming (network, container, ifname) by hash. DEL
and GC find them by that tag, so they work without the pod's addresses, which the
reference bridge needs and loses when the netns is gone (plugins#810).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from weftlib.cni import errors
from weftlib.cni.errors import CniError
from weftlib.kernel import nat


def _h(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def network_tag(network: str) -> str:
    return f"weft:{_h(network)}:"


def owner_tag(network: str, container_id: str, ifname: str) -> str:
    return f"{network_tag(network)}{_h(container_id + '/' + ifname)}"


def _failed(e: nat.NatError) -> CniError:
    return CniError(errors.INTERNAL, f"ipMasq: {e}")


def add(network: str, container_id: str, ifname: str,
        addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface]) -> None:
    try:
        nat.add(nat.pod_elements(owner_tag(network, container_id, ifname), addresses))
    except nat.NatError as e:
        raise _failed(e) from None


def present(network: str, container_id: str, ifname: str,
            addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface]) -> bool:
    """Whether the pod's addresses are masqueraded: their elements are there, and so is the chain that uses them."""
    want = set(nat.pod_elements(owner_tag(network, container_id, ifname), addresses))
    try:
        now = nat.listing()
    except nat.NatError as e:
        raise _failed(e) from None
    return now.rules is not None and bool(now.rules.get(nat.POSTROUTING)) and want <= set(now.elements)


def remove(network: str, container_id: str, ifname: str) -> None:
    try:
        nat.remove_owned(owner_tag(network, container_id, ifname))
    except nat.NatError as e:
        raise _failed(e) from None


def collect(network: str, valid: Iterable[tuple[str, str]]) -> None:
    """Removes this network's elements whose owner is not a valid attachment."""
    keep = {owner_tag(network, cid, ifn) for cid, ifn in valid}
    prefix = network_tag(network)
    try:
        nat.delete([e for e in nat.listing().elements if e.owner.startswith(prefix) and e.owner not in keep])
    except nat.NatError as e:
        raise _failed(e) from None
