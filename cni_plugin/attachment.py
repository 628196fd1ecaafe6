"""A pod's attachment to the node bridge, made with pyroute2: bridge, veth pair, addresses, routes.

Ownership: every link Weft creates carries the link group GROUP, set in the same
netlink message that creates it, and host veths are named after their owner
(container ID and ifname). Weft only deletes links that carry both marks.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_plugin import errors
from cni_plugin.errors import CniError
from cni_plugin.netns import NetNS
from cni_plugin.result import Interface, Route

GROUP = 0x77656674  # "weft"
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RTNH_F_ONLINK = 4


def host_veth_name(container_id: str, ifname: str) -> str:
    return "weft" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:8]


def alias(network: str, container_id: str, ifname: str) -> str:
    return f"weft {network} {container_id} {ifname}"[:255]


def get_link(ipr: IPRoute, name: str) -> Any:
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def kind(link: Any) -> str | None:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


def _sysctl(path: str, value: str, missing_ok: bool = True) -> None:
    try:
        with open(path, "r+", encoding="ascii") as f:
            if f.read().strip() != value:
                f.seek(0)
                f.write(value)
    except FileNotFoundError:
        if not missing_ok:
            raise


def random_mac() -> str:
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{x:02x}" for x in b)


@dataclass
class Bridge:
    """The node bridge as ADD found it (link None if missing), and its addresses."""

    name: str
    link: Any
    addresses: list[IPInterface]

    @property
    def index(self) -> int:
        return int(self.link["index"])

    @property
    def mac(self) -> str:
        return str(self.link.get("IFLA_ADDRESS"))


def find_bridge(ipr: IPRoute, name: str) -> Bridge:
    link = get_link(ipr, name)
    if link is None:
        return Bridge(name, None, [])
    if kind(link) != "bridge":
        raise CniError(errors.INVALID_CONFIG, f"{name!r} already exists but is not a bridge")
    return Bridge(name, link, [ipaddress.ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                               for a in ipr.get_addr(index=link["index"])])


def conflicts(br: Bridge, gateways: list[IPInterface]) -> list[IPInterface]:
    """Addresses on the bridge that clash with the gateways Weft must put there.

    IPv4: any other address is a clash (the bridge plugin's rule). IPv6: only overlapping prefixes.
    """
    clash = []
    for gw in gateways:
        for a in br.addresses:
            if a == gw or a.version != gw.version or (a.version == 6 and a.ip.is_link_local):
                continue
            if a.version == 4 or a.network.overlaps(gw.network):
                clash.append(a)
    return clash


def refuse_conflicts(br: Bridge, gateways: list[IPInterface], force: bool) -> None:
    clash = conflicts(br, gateways)
    if clash and not force:
        raise CniError(errors.INVALID_CONFIG,
                       f"{br.name!r} already has an IP address different from "
                       f"{', '.join(map(str, gateways))}: {', '.join(map(str, clash))} "
                       "(set forceAddress to replace it)",
                       msg="bridge address conflict")


IFF_UP, IFF_PROMISC = 0x1, 0x100


def ensure_bridge(ipr: IPRoute, br: Bridge, mtu: int | None, promisc: bool) -> bool:
    """Creates the bridge if it was missing (concurrent ADDs may race: EEXIST is fine), and brings it up.

    Fills in `br.link`; True if this call created it.
    """
    created = False
    if br.link is None:
        try:
            # An address of its own, set at creation: otherwise the kernel gives the bridge its lowest
            # port's, and the gateway's MAC changes under every pod whenever that port comes or goes.
            spec: dict[str, Any] = {"ifname": br.name, "kind": "bridge", "group": GROUP, "br_forward_delay": 0,
                                    "address": random_mac(), "state": "up"}
            if mtu:
                spec["mtu"] = mtu
            if promisc:
                spec["promisc"] = 1
            ipr.link("add", **spec)
            created = True
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        found = find_bridge(ipr, br.name)
        if found.link is None:
            raise CniError(errors.INTERNAL, f"bridge {br.name} vanished while it was being set up")
        br.link, br.addresses = found.link, found.addresses
    _sysctl(f"/proc/sys/net/ipv6/conf/{br.name}/accept_ra", "0")
    flags = br.link["flags"]
    if not flags & IFF_UP or (promisc and not flags & IFF_PROMISC):
        ipr.link("set", index=br.index, state="up", **({"promisc": 1} if promisc else {}))
    return created


def ensure_bridge_addresses(ipr: IPRoute, br: Bridge, gateways: list[IPInterface], force: bool) -> None:
    refuse_conflicts(br, gateways, force)
    for a in conflicts(br, gateways):
        ignore_errno(ipr.addr, "del", index=br.index, address=str(a.ip), prefixlen=a.network.prefixlen,
                     codes=(errno.EADDRNOTAVAIL,))
    for gw in gateways:
        if gw not in br.addresses:
            ignore_errno(ipr.addr, "add", index=br.index, address=str(gw.ip), prefixlen=gw.network.prefixlen,
                         codes=(errno.EEXIST,))
    if any(g.version == 4 for g in gateways):
        _sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    if any(g.version == 6 for g in gateways):
        _sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")


def ignore_errno(fn: Any, *argv: Any, codes: tuple[int, ...], **kw: Any) -> None:
    """Calls a pyroute2 method, treating the netlink errors in `codes` as success (idempotence)."""
    try:
        fn(*argv, **kw)
    except NetlinkError as e:
        if e.code not in codes:
            raise


@dataclass
class Veth:
    host: Interface
    host_index: int
    container: Interface
    container_index: int


def open_in(ns: NetNS) -> IPRoute:
    """A netlink socket bound to the pod's namespace; it stays there after this thread returns home."""
    with ns.entered():
        return IPRoute()


def create_veth(ipr: IPRoute, pod: IPRoute, ns: NetNS, ifname: str, host_name: str, mtu: int | None,
                bridge_index: int, hairpin: bool, link_alias: str) -> Veth:
    """The pair, its host end up on the bridge and labelled: three netlink requests."""
    host_mac = random_mac()
    peer: dict[str, Any] = {"ifname": ifname, "net_ns_fd": ns.fd, "group": GROUP}
    spec: dict[str, Any] = {"ifname": host_name, "kind": "veth", "group": GROUP, "peer": peer,
                            "address": host_mac, "master": bridge_index, "state": "up"}
    if mtu:
        spec["mtu"] = peer["mtu"] = mtu
    for attempt in (1, 2):
        try:
            ipr.link("add", **spec)
            break
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
            # The pod's name was checked free before IPAM ran, so this is most likely a host end left
            # by an ADD that was killed before it finished.
            stale = get_link(ipr, host_name) if attempt == 1 else None
            if stale is None:
                raise CniError(errors.INVALID_ENV, f"interface {ifname} already exists in {ns.path}") from None
            if stale.get("group") != GROUP:
                raise CniError(errors.INVALID_CONFIG,
                               f"host interface {host_name} exists and was not created by weft") from None
            ignore_errno(ipr.link, "del", index=stale["index"], codes=(errno.ENODEV,))
    c = get_link(pod, ifname)
    host_index = c.get("IFLA_LINK")
    # The kernel ignores an alias in the creating request, so the label is a second one.
    ipr.link("set", index=host_index, ifalias=link_alias)
    _sysctl(f"/proc/sys/net/ipv6/conf/{host_name}/accept_ra", "0")
    if hairpin:
        ipr.brport("set", index=host_index, mode=1)
    return Veth(Interface(host_name, host_mac), host_index,
                Interface(ifname, c.get("IFLA_ADDRESS"), ns.path, mtu), c["index"])


def configure_container(pod: IPRoute, ns: NetNS, veth: Veth, addresses: list[IPInterface], routes: list[Route],
                        enable_dad: bool) -> None:
    ifname, idx = veth.container.name, veth.container_index
    with ns.entered():  # /proc/sys/net is the calling thread's namespace
        if any(a.version == 6 for a in addresses):
            _sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "0")
            _sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/accept_dad", "1" if enable_dad else "0")
        _sysctl(f"/proc/sys/net/ipv4/conf/{ifname}/arp_notify", "1")
    for a in addresses:
        ignore_errno(pod.addr, "add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen,
                     codes=(errno.EEXIST,))
    pod.link("set", index=idx, state="up")
    for r in routes:
        spec: dict[str, Any] = {"dst": str(r.dst), "oif": idx}
        if r.gw is not None:
            spec["gateway"] = str(r.gw)
        else:
            spec["scope"] = 253  # link
        if r.priority:
            spec["priority"] = r.priority
        if r.table:
            spec["table"] = r.table
        pod.route("replace", **spec)


def delete_host_veth(ipr: IPRoute, host_name: str) -> bool:
    """Deletes the pair (and so the pod's end) if Weft made it; False if there was none of ours."""
    link = get_link(ipr, host_name)
    if link is None or link.get("group") != GROUP:
        return False
    ignore_errno(ipr.link, "del", index=link["index"], codes=(errno.ENODEV,))
    return True


def delete_bridge_if_unused(ipr: IPRoute, index: int) -> None:
    link = ipr.link("get", index=index)[0]
    if link.get("group") != GROUP:
        return
    if not any(p.get("master") == index for p in ipr.get_links()):
        ignore_errno(ipr.link, "del", index=index, codes=(errno.ENODEV,))


def weft_veths(ipr: IPRoute, network: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(container ID, ifname) of every host veth Weft made for `network`, and the names of Weft's
    veths without a label: the kernel ignores an alias in the creating message, so an ADD killed
    between creating the veth and labelling it leaves one, which only GC can find."""
    labelled, unlabelled = [], []
    for link in ipr.get_links():
        if link.get("group") != GROUP or kind(link) != "veth":
            continue
        alias = link.get("IFLA_IFALIAS") or ""
        words = alias.split(" ")
        if len(words) == 4 and words[0] == "weft" and words[1] == network:
            labelled.append((words[2], words[3]))
        elif not alias:
            unlabelled.append(link.get("IFLA_IFNAME"))
    return labelled, unlabelled


def check(ipr: IPRoute, ns: NetNS, bridge: str, host_name: str, container: Interface,
          addresses: list[IPInterface], routes: list[Route]) -> None:
    """Raises CniError naming the first thing that drifted from prevResult."""
    def fail(what: str) -> CniError:
        return CniError(errors.INVALID_CONFIG, what, msg="attachment check failed")

    br = get_link(ipr, bridge)
    if br is None or kind(br) != "bridge":
        raise fail(f"bridge {bridge} is missing or not a bridge")
    host = get_link(ipr, host_name)
    if host is None or host.get("group") != GROUP:
        raise fail(f"host veth {host_name} is missing")
    if host.get("master") != br["index"]:
        raise fail(f"host veth {host_name} is not attached to {bridge}")
    with open_in(ns) as pod:
        link = get_link(pod, container.name)
        if link is None:
            raise fail(f"interface {container.name} is missing from {ns.path}")
        if kind(link) != "veth":
            raise fail(f"interface {container.name} is {kind(link)}, not veth")
        if container.mac and link.get("IFLA_ADDRESS", "").lower() != container.mac.lower():
            raise fail(f"interface {container.name} has MAC {link.get('IFLA_ADDRESS')}, expected {container.mac}")
        if link.get("IFLA_LINK") != host["index"]:
            raise fail(f"interface {container.name} is not the peer of {host_name}")
        have = {ipaddress.ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                for a in pod.get_addr(index=link["index"])}
        for a in addresses:
            if a not in have:
                raise fail(f"address {a} is missing from {container.name}")
        table = []
        for fam in sorted({2 if r.dst.version == 4 else 10 for r in routes}):
            for r in pod.get_routes(family=fam):
                dst = r.get("RTA_DST")
                net = ipaddress.ip_network(f"{dst}/{r['dst_len']}" if dst else
                                           ("0.0.0.0/0" if fam == 2 else "::/0"))
                gw = r.get("RTA_GATEWAY")
                table.append((net, ipaddress.ip_address(gw) if gw else None))
        for route in routes:
            if not any(net == route.dst and (route.gw is None or gw == route.gw) for net, gw in table):
                raise fail(f"route {route.dst}{' via ' + str(route.gw) if route.gw else ''} is missing "
                           f"from {ns.path}")
