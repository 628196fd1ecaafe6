"""The plugin's netlink messages, built on the wire format (weftlib.kernel.rtnl), against pyroute2's
encoding of the same requests: byte for byte, attribute for attribute."""

from __future__ import annotations

import socket
from typing import Any

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from weftlib.kernel import rtnl
from weftlib.kernel.rtnl import (
    IFADDRMSG,
    IFINFOMSG,
    IFLA_ADDRESS,
    IFLA_BR_FORWARD_DELAY,
    IFLA_BRPORT_MODE,
    IFLA_GROUP,
    IFLA_IFALIAS,
    IFLA_IFNAME,
    IFLA_MASTER,
    IFLA_MTU,
    IFLA_NET_NS_FD,
    RTMSG,
    nla_link_info,
    nla_mac,
    nla_str,
    nla_u8,
    nla_u32,
    veth_peer,
)


def pyroute2_body(msg: Any) -> bytes:
    msg.encode()
    return bytes(msg.data[16:])  # after the netlink header


def ifinfo(attrs: list[tuple[str, Any]], index: int = 0, flags: int = 0) -> bytes:
    msg = ifinfmsg()
    msg["index"], msg["flags"], msg["change"], msg["attrs"] = index, flags, flags, attrs
    return pyroute2_body(msg)


def test_veth_creation_matches_pyroute2() -> None:
    peer = nla_str(IFLA_IFNAME, "eth0") + nla_u32(IFLA_NET_NS_FD, 7) + nla_u32(IFLA_GROUP, 0x77656674) \
        + nla_u32(IFLA_MTU, 1450)
    ours = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 1, 1) + nla_str(IFLA_IFNAME, "weft1234abcd") \
        + nla_u32(IFLA_GROUP, 0x77656674) + nla_mac(IFLA_ADDRESS, "0a:11:22:33:44:55") + nla_u32(IFLA_MASTER, 3) \
        + nla_u32(IFLA_MTU, 1450) + nla_link_info("veth", veth_peer(peer))
    theirs = ifinfo([("IFLA_IFNAME", "weft1234abcd"), ("IFLA_GROUP", 0x77656674), ("IFLA_ADDRESS", "0a:11:22:33:44:55"),
                     ("IFLA_MASTER", 3), ("IFLA_MTU", 1450),
                     ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "veth"), ("IFLA_INFO_DATA", {"attrs": [
                         ("VETH_INFO_PEER", {"attrs": [("IFLA_IFNAME", "eth0"), ("IFLA_NET_NS_FD", 7),
                                                       ("IFLA_GROUP", 0x77656674), ("IFLA_MTU", 1450)]})]})]})],
                    flags=1)
    assert ours == theirs


def test_bridge_creation_and_port_label_match_pyroute2() -> None:
    ours = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + nla_str(IFLA_IFNAME, "cni0") \
        + nla_link_info("bridge", nla_u32(IFLA_BR_FORWARD_DELAY, 0))
    theirs = ifinfo([("IFLA_IFNAME", "cni0"), ("IFLA_LINKINFO", {"attrs": [
        ("IFLA_INFO_KIND", "bridge"), ("IFLA_INFO_DATA", {"attrs": [("IFLA_BR_FORWARD_DELAY", 0)]})]})])
    assert ours == theirs
    label = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 9, 0, 0) + nla_str(IFLA_IFALIAS, "weft net c1 eth0") \
        + nla_link_info("", slave_kind="bridge", slave_data=nla_u8(IFLA_BRPORT_MODE, 1))
    assert label == ifinfo([("IFLA_IFALIAS", "weft net c1 eth0"), ("IFLA_LINKINFO", {"attrs": [
        ("IFLA_INFO_SLAVE_KIND", "bridge"), ("IFLA_INFO_SLAVE_DATA", {"attrs": [("IFLA_BRPORT_MODE", 1)]})]})],
        index=9)


def test_address_and_route_match_pyroute2() -> None:
    msg = ifaddrmsg()
    msg["family"], msg["prefixlen"], msg["index"] = socket.AF_INET, 24, 4
    msg["attrs"] = [("IFA_ADDRESS", "10.1.2.3"), ("IFA_LOCAL", "10.1.2.3")]
    value = socket.inet_pton(socket.AF_INET, "10.1.2.3")
    assert IFADDRMSG.pack(socket.AF_INET, 24, 0, 0, 4) + rtnl.attribute(1, value) + rtnl.attribute(2, value) \
        == pyroute2_body(msg)
    route = rtmsg()
    route["family"], route["dst_len"], route["table"], route["proto"], route["type"] = socket.AF_INET6, 0, 254, 4, 1
    route["attrs"] = [("RTA_OIF", 4), ("RTA_GATEWAY", "fd00::1")]
    ours = RTMSG.pack(socket.AF_INET6, 0, 0, 0, 254, 4, 0, 1, 0) + nla_u32(rtnl.RTA_OIF, 4) \
        + rtnl.attribute(rtnl.RTA_GATEWAY, socket.inet_pton(socket.AF_INET6, "fd00::1"))
    assert ours == pyroute2_body(route)


def test_link_facts_reads_what_pyroute2_writes() -> None:
    body = ifinfo([("IFLA_IFNAME", "weftabc"), ("IFLA_ADDRESS", "0a:00:00:00:00:01"), ("IFLA_LINK", 12),
                   ("IFLA_MASTER", 3), ("IFLA_GROUP", 0x77656674), ("IFLA_IFALIAS", "weft n c eth0"),
                   ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "veth")]})], index=5, flags=0x101)
    facts = rtnl.link_facts(body)
    assert facts == rtnl.LinkFacts(5, "weftabc", "veth", "0a:00:00:00:00:01", 12, 3, 0x77656674, 0x101,
                                   "weft n c eth0")


def test_message_types_and_flags_are_the_kernels() -> None:
    import pyroute2.netlink as nl
    import pyroute2.netlink.rtnl as rt

    for name in ("NLM_F_REQUEST", "NLM_F_MULTI", "NLM_F_ACK", "NLM_F_DUMP", "NLM_F_REPLACE", "NLM_F_EXCL",
                 "NLM_F_CREATE", "NLMSG_ERROR", "NLMSG_DONE"):
        assert getattr(rtnl, name) == getattr(nl, name), name
    for name in ("RTM_NEWLINK", "RTM_DELLINK", "RTM_GETLINK", "RTM_NEWADDR", "RTM_DELADDR", "RTM_GETADDR",
                 "RTM_NEWROUTE", "RTM_DELROUTE", "RTM_GETROUTE", "RTM_NEWNEIGH", "RTM_DELNEIGH", "RTM_GETNEIGH"):
        assert getattr(rtnl, name) == getattr(rt, name), name


def test_neighbour_address_and_route_flags_are_the_kernels() -> None:
    import pyroute2.netlink.rtnl as rt
    from pyroute2.netlink.rtnl import ifaddrmsg, ndmsg, rtmsg

    for name in ("NUD_NOARP", "NUD_PERMANENT", "NTF_SELF"):
        assert getattr(rtnl, name) == getattr(ndmsg, name), name
    for name in ("IFA_F_NODAD", "IFA_F_DADFAILED", "IFA_F_DEPRECATED", "IFA_F_TENTATIVE"):
        assert getattr(rtnl, name) == getattr(ifaddrmsg, name), name
    assert rtnl.RTNH_F_ONLINK == rtmsg.RTNH_F_ONLINK
    assert (rtnl.RT_SCOPE_UNIVERSE, rtnl.RT_SCOPE_LINK, rtnl.RT_SCOPE_NOWHERE) == (
        rt.rt_scope["universe"], rt.rt_scope["link"], rt.rt_scope["nowhere"])
    assert (rtnl.RTN_UNICAST, rtnl.RTPROT_STATIC) == (rt.rt_type["unicast"], rt.rt_proto["static"])


def test_vxlan_settings_are_the_kernels() -> None:
    from pyroute2.netlink.rtnl.ifinfmsg.plugins.vxlan import vxlan

    numbers = {name: i for i, (name, _) in enumerate(vxlan.nla_map)}
    for name in ("IFLA_VXLAN_ID", "IFLA_VXLAN_LINK", "IFLA_VXLAN_LOCAL", "IFLA_VXLAN_LEARNING", "IFLA_VXLAN_PORT",
                 "IFLA_VXLAN_LOCAL6"):
        assert getattr(rtnl, name) == numbers[name], name


def test_link_facts_carry_mtu_and_kind_settings() -> None:
    body = ifinfo([("IFLA_IFNAME", "weft.1"), ("IFLA_MTU", 1450), ("IFLA_LINKINFO", {"attrs": [
        ("IFLA_INFO_KIND", "vxlan"), ("IFLA_INFO_DATA", {"attrs": [("IFLA_VXLAN_ID", 1), ("IFLA_VXLAN_PORT", 8472),
                                                                   ("IFLA_VXLAN_LOCAL", "192.0.2.1")]})]})])
    facts = rtnl.link_facts(body)
    data = rtnl.attributes(facts.info_data, 0)
    assert (facts.kind, facts.mtu) == ("vxlan", 1450)
    assert rtnl.get_u32(data[rtnl.IFLA_VXLAN_ID]) == 1 and rtnl.BE16.unpack(data[rtnl.IFLA_VXLAN_PORT])[0] == 8472
    assert data[rtnl.IFLA_VXLAN_LOCAL] == socket.inet_aton("192.0.2.1")
