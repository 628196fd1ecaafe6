"""A pod's attachment to the node bridge: bridge, veth pair, addresses, routes (weftlib.kernel.rtnl).

Ownership: every link Weft creates carries the link group GROUP (weftlib.kernel.netlink),
and host veths are named after their owner (container ID and ifname). Weft only
deletes links that carry both marks.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass

from weftlib.cni import errors
from weftlib.cni.errors import CniError
from weftlib.cni.result import Interface, Route
from weftlib.ipnet import IPInterface
from weftlib.kernel import rtnl, sysctl
from weftlib.kernel.netlink import GROUP, random_mac
from weftlib.kernel.netns import NetNS
from weftlib.kernel.rtnl import (
    IFA_F_NODAD,
    IFF_PROMISC,
    IFF_UP,
    IFLA_ADDRESS,
    IFLA_BR_FORWARD_DELAY,
    IFLA_BRPORT_MODE,
    IFLA_GROUP,
    IFLA_IFALIAS,
    IFLA_IFNAME,
    IFLA_MASTER,
    IFLA_MTU,
    IFLA_NET_NS_FD,
    LinkFacts,
    Rtnl,
    nla_link_info,
    nla_mac,
    nla_str,
    nla_u8,
    nla_u32,
    veth_peer,
)


def alias(network: str, container_id: str, ifname: str) -> str:
    return f"weft {network} {container_id} {ifname}"[:255]


@dataclass
class Bridge:
    """The node bridge as ADD found it (link None if missing), and its addresses."""

    name: str
    link: LinkFacts | None
    addresses: list[IPInterface]

    @property
    def index(self) -> int:
        assert self.link is not None
        return self.link.index

    @property
    def mac(self) -> str:
        assert self.link is not None
        return str(self.link.mac)


def find_bridge(rt: Rtnl, name: str) -> Bridge:
    link = rt.link(name)
    if link is None:
        return Bridge(name, None, [])
    if link.kind != "bridge":
        raise CniError(errors.INVALID_CONFIG, f"{name!r} already exists but is not a bridge")
    return Bridge(name, link, [ipaddress.ip_interface(f"{addr}/{plen}") for _, addr, plen in rt.addresses(link.index)])


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


def ensure_bridge(rt: Rtnl, br: Bridge, mtu: int | None, promisc: bool) -> bool:
    """Creates the bridge if it was missing (concurrent ADDs may race: EEXIST is fine), and brings it up.

    Fills in `br.link`; True if this call created it.
    """
    created = False
    if br.link is None:
        # An address of its own, set at creation: otherwise the kernel gives the bridge its lowest
        # port's, and the gateway's MAC changes under every pod whenever that port comes or goes.
        attrs = (nla_str(IFLA_IFNAME, br.name) + nla_u32(IFLA_GROUP, GROUP) + nla_mac(IFLA_ADDRESS, random_mac())
                 + nla_link_info("bridge", nla_u32(IFLA_BR_FORWARD_DELAY, 0)))
        if mtu:
            attrs += nla_u32(IFLA_MTU, mtu)
        # Down until its IPv6 settings below are in: it comes up further down.
        created = not rt.new_link(attrs, up=False, promisc=promisc, create=True, ok=(errno.EEXIST,))
        found = find_bridge(rt, br.name)
        if found.link is None:
            raise CniError(errors.INTERNAL, f"bridge {br.name} vanished while it was being set up")
        br.link, br.addresses = found.link, found.addresses
    sysctl.write(f"/proc/sys/net/ipv6/conf/{br.name}/accept_ra", "0")
    # No duplicate address detection for the bridge's link-local address either: the kernel solicits
    # neighbours for forwarded IPv6 packets from it, and sends no solicitation while it is tentative
    # (with DAD, pods on a new node are unreachable from other nodes for 2 s).
    sysctl.write(f"/proc/sys/net/ipv6/conf/{br.name}/accept_dad", "0")
    assert br.link is not None
    flags = br.link.flags
    if not flags & IFF_UP or (promisc and not flags & IFF_PROMISC):
        rt.new_link(b"", index=br.index, up=True, promisc=promisc)
    return created


def ensure_bridge_addresses(rt: Rtnl, br: Bridge, gateways: list[IPInterface], force: bool) -> None:
    refuse_conflicts(br, gateways, force)
    for a in conflicts(br, gateways):
        rt.del_addr(br.index, str(a.ip), a.network.prefixlen, ok=(errno.EADDRNOTAVAIL,))
    for gw in gateways:
        if gw not in br.addresses:
            # No duplicate address detection for an IPv6 gateway: it would stay tentative (1.8 s here), and
            # pods' first packets would find no router.
            rt.add_addr(br.index, str(gw.ip), gw.network.prefixlen, IFA_F_NODAD if gw.version == 6 else 0,
                        ok=(errno.EEXIST,))
    if any(g.version == 4 for g in gateways):
        sysctl.write("/proc/sys/net/ipv4/ip_forward", "1")
    if any(g.version == 6 for g in gateways):
        sysctl.write("/proc/sys/net/ipv6/conf/all/forwarding", "1")


@dataclass
class Veth:
    host: Interface
    host_index: int
    container: Interface
    container_index: int


def create_veth(rt: Rtnl, pod: Rtnl, ns: NetNS, ifname: str, host_name: str, mtu: int | None,
                bridge_index: int, hairpin: bool, link_alias: str) -> Veth:
    """The pair, its host end up on the bridge and labelled: three netlink requests."""
    host_mac = random_mac()
    peer = nla_str(IFLA_IFNAME, ifname) + nla_u32(IFLA_NET_NS_FD, ns.fd) + nla_u32(IFLA_GROUP, GROUP)
    attrs = (nla_str(IFLA_IFNAME, host_name) + nla_u32(IFLA_GROUP, GROUP) + nla_mac(IFLA_ADDRESS, host_mac)
             + nla_u32(IFLA_MASTER, bridge_index))
    if mtu:
        peer += nla_u32(IFLA_MTU, mtu)
        attrs += nla_u32(IFLA_MTU, mtu)
    attrs += nla_link_info("veth", veth_peer(peer))
    for attempt in (1, 2):
        if not rt.new_link(attrs, up=True, create=True, ok=(errno.EEXIST,)):
            break
        # The pod's name was checked free before IPAM ran, so this is most likely a host end left
        # by an ADD that was killed before it finished.
        stale = rt.link(host_name) if attempt == 1 else None
        if stale is None:
            raise CniError(errors.INVALID_ENV, f"interface {ifname} already exists in {ns.path}")
        if stale.group != GROUP:
            raise CniError(errors.INVALID_CONFIG, f"host interface {host_name} exists and was not created by weft")
        rt.del_link(stale.index)
    c = pod.link(ifname)
    if c is None or c.peer is None:
        raise CniError(errors.INTERNAL, f"interface {ifname} vanished from {ns.path} while it was being set up")
    host_index = c.peer
    # The kernel ignores an alias in the creating request, so the label (and hairpin) is a second one.
    label = nla_str(IFLA_IFALIAS, link_alias)
    if hairpin:
        label += nla_link_info("", slave_kind="bridge", slave_data=nla_u8(IFLA_BRPORT_MODE, 1))
    rt.new_link(label, index=host_index)
    sysctl.write(f"/proc/sys/net/ipv6/conf/{host_name}/accept_ra", "0")
    return Veth(Interface(host_name, host_mac), host_index, Interface(ifname, c.mac or "", ns.path, mtu), c.index)


def configure_container(pod: Rtnl, ns: NetNS, veth: Veth, addresses: list[IPInterface], routes: list[Route],
                        enable_dad: bool) -> None:
    ifname, idx = veth.container.name, veth.container_index
    with ns.entered():  # /proc/sys/net is the calling thread's namespace
        if any(a.version == 6 for a in addresses):
            sysctl.write(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "0")
            sysctl.write(f"/proc/sys/net/ipv6/conf/{ifname}/accept_dad", "1" if enable_dad else "0")
        sysctl.write(f"/proc/sys/net/ipv4/conf/{ifname}/arp_notify", "1")
    for a in addresses:
        pod.add_addr(idx, str(a.ip), a.network.prefixlen, ok=(errno.EEXIST,))
    pod.new_link(b"", index=idx, up=True)
    for r in routes:
        pod.replace_route(str(r.dst.network_address), r.dst.prefixlen, idx,
                          gateway=str(r.gw) if r.gw is not None else None,
                          scope=0 if r.gw is not None else 253,  # link
                          priority=r.priority or None, table=r.table or None)


def delete_host_veth(rt: Rtnl, host_name: str) -> bool:
    """Deletes the pair (and so the pod's end) if Weft made it; False if there was none of ours."""
    link = rt.link(host_name)
    if link is None or link.group != GROUP:
        return False
    rt.del_link(link.index)
    return True


def delete_bridge_if_unused(rt: Rtnl, index: int) -> None:
    link = rt.link(index=index)
    if link is None or link.group != GROUP:
        return
    if not any(p.master == index for p in rt.links()):
        rt.del_link(index)


def weft_veths(rt: Rtnl, network: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(container ID, ifname) of every host veth Weft made for `network`, and the names of Weft's
    veths without a label: the kernel ignores an alias in the creating message, so an ADD killed
    between creating the veth and labelling it leaves one, which only GC can find."""
    labelled, unlabelled = [], []
    for link in rt.links():
        if link.group != GROUP or link.kind != "veth":
            continue
        words = (link.alias or "").split(" ")
        if len(words) == 4 and words[0] == "weft" and words[1] == network:
            labelled.append((words[2], words[3]))
        elif not link.alias:
            unlabelled.append(link.name)
    return labelled, unlabelled


def check(rt: Rtnl, ns: NetNS, bridge: str, host_name: str, container: Interface,
          addresses: list[IPInterface], routes: list[Route]) -> None:
    """Raises CniError naming the first thing that drifted from prevResult."""
    def fail(what: str) -> CniError:
        return CniError(errors.INVALID_CONFIG, what, msg="attachment check failed")

    # Host side: two gets (a dump would read every pod's veth). Pod side: one dump per kind.
    br = rt.link(bridge)
    if br is None or br.kind != "bridge":
        raise fail(f"bridge {bridge} is missing or not a bridge")
    host = rt.link(host_name)
    if host is None or host.group != GROUP:
        raise fail(f"host veth {host_name} is missing")
    if host.master != br.index:
        raise fail(f"host veth {host_name} is not attached to {bridge}")
    with Rtnl.open_in(ns) as pod:
        link = next((lk for lk in pod.links() if lk.name == container.name), None)
        if link is None:
            raise fail(f"interface {container.name} is missing from {ns.path}")
        if link.kind != "veth":
            raise fail(f"interface {container.name} is {link.kind}, not veth")
        if container.mac and (link.mac or "").lower() != container.mac.lower():
            raise fail(f"interface {container.name} has MAC {link.mac}, expected {container.mac}")
        if link.peer != host.index:
            raise fail(f"interface {container.name} is not the peer of {host_name}")
        have = {ipaddress.ip_interface(f"{addr}/{plen}") for index, addr, plen in pod.addresses()
                if index == link.index}
        for a in addresses:
            if a not in have:
                raise fail(f"address {a} is missing from {container.name}")
        table = [(ipaddress.ip_network(f"{dst}/{plen}"), ipaddress.ip_address(gw) if gw else None)
                 for dst, plen, gw in rtnl.unicast_routes(pod)] if routes else []
        for route in routes:
            if not any(net == route.dst and (route.gw is None or gw == route.gw) for net, gw in table):
                raise fail(f"route {route.dst}{' via ' + str(route.gw) if route.gw else ''} is missing "
                           f"from {ns.path}")
