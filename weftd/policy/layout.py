"""The fixed layout of the policy tables: their names, the base chain, the maps and sets that list the node's
pods, the bridge table's anti-spoofing, and the transaction that replaces both tables at once.

    table inet weft_policy
      forward (hook forward, sees every pod-to-pod path with br_netfilter on)
        ct established,related accept; neighbour discovery on the bridge accept; a pod to itself accept
        ip saddr vmap @egress4    -> e_<hash>: the source pod's egress rules, `return` when allowed, else drop
        ip daddr vmap @ingress4   -> i_<hash>: the destination pod's ingress rules, likewise
    table bridge weft_policy
      prerouting: a Weft veth port may send IPv4, ARP and IPv6 only from its pod's own addresses
        (IPv6 also: duplicate address detection from ::, neighbour discovery and MLD from link-local;
        never router advertisements, nor neighbour advertisements for another pod's address)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import netaddr

TABLE = "weft_policy"
SPOOFED = "spoofed"
PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
FAMILY = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}


@dataclass(frozen=True)
class PortBinding:
    """A pod's host veth and the addresses it may send from (anti-spoofing)."""

    ifname: str
    ips: tuple[netaddr.IPAddress, ...]


BASE_RULES = (
    "ct state established,related accept",
    # Neighbour discovery between pods on one bridge: conntrack leaves it untracked (invalid to the pod
    # chains), and hop limit 255 proves it was not routed (RFC 4861 7.1).
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
    "ip saddr . ip daddr @self4 accept", "ip6 saddr . ip6 daddr @self6 accept",
    "ip saddr vmap @egress4", "ip6 saddr vmap @egress6",
    "ip daddr vmap @ingress4", "ip6 daddr vmap @ingress6")
# The maps and sets of table inet that list the node's own pods, with their types.
POD_SETS = {
    **{f"{d}{v}": f"map {d}{v} {{ type {FAMILY[v][1]} : verdict;" for d in ("egress", "ingress") for v in (4, 6)},
    **{f"self{v}": f"set self{v} {{ type {FAMILY[v][1]} . {FAMILY[v][1]};" for v in (4, 6)},
}

# What a pod may send over IPv6 before, or besides, its own address (RFC 4861, 4862, 3810): duplicate
# address detection and MLD reports from ::, neighbour discovery and MLD from its link-local address.
# Nothing else from link-local: bridged link-local traffic between pods would bypass every policy.
ND_FROM_UNSPECIFIED = "nd-neighbor-solicit, mld2-listener-report"
ND_FROM_LINK_LOCAL = ("nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, "
                      "mld-listener-done, mld2-listener-report")
BRIDGE_RULES = (
    "iifname != @ports return",
    # IPv4 and ARP only from the pod's address; 0.0.0.0: an ARP probe (RFC 5227) claims nothing
    f'ether type ip iifname . ip saddr != @own4 counter name "{SPOOFED}" drop',
    f'ether type arp arp saddr ip != 0.0.0.0 iifname . arp saddr ip != @own4 counter name "{SPOOFED}" drop',
    # a pod is no router: no router advertisements or redirects
    f'ether type ip6 icmpv6 type {{ nd-router-advert, nd-redirect }} counter name "{SPOOFED}" drop',
    f"ether type ip6 ip6 saddr :: icmpv6 type {{ {ND_FROM_UNSPECIFIED} }} return",
    # a neighbour advertisement claims its target address (the ARP reply of IPv6): own or link-local
    f'ether type ip6 icmpv6 type nd-neighbor-advert @th,64,16 & 0xffc0 != 0xfe80 '
    f'iifname . @th,64,128 != @target6 counter name "{SPOOFED}" drop',
    f"ether type ip6 ip6 saddr fe80::/10 icmpv6 type {{ {ND_FROM_LINK_LOCAL} }} return",
    f'ether type ip6 iifname . ip6 saddr != @own6 counter name "{SPOOFED}" drop',
)
BRIDGE_SETS = {"ports": "type ifname;", "own4": "type ifname . ipv4_addr;", "own6": "type ifname . ipv6_addr;",
               "target6": "typeof iifname . @th,64,128;"}


def bridge_elements(bindings: Iterable[PortBinding]) -> dict[str, set[str]]:
    """The bridge table's sets: every Weft veth, and the addresses each may send from."""
    out: dict[str, set[str]] = {name: set() for name in BRIDGE_SETS}
    for bd in bindings:
        out["ports"].add(f'"{bd.ifname}"')
        for ip in bd.ips:
            out[f"own{ip.version}"].add(f'"{bd.ifname}" . {ip}')
            if ip.version == 6:
                out["target6"].add(f'"{bd.ifname}" . {int(ip):#034x}')
    return out


def body(elements: Iterable[str]) -> str:
    items = sorted(elements)
    return f" elements = {{ {', '.join(items)} }}" if items else ""


def bridge_table(elements: Mapping[str, Iterable[str]]) -> str:
    """Anti-spoofing on every Weft veth port: a pod sends only from its own addresses."""
    return (f"table bridge {TABLE} {{\n"
            + "".join(f"  set {name} {{ {kind}{body(elements[name])} }}\n" for name, kind in BRIDGE_SETS.items())
            + f"  counter {SPOOFED} {{ }}\n"
            "  chain prerouting {\n    type filter hook prerouting priority -300; policy accept;\n"
            + "".join(f"    {r}\n" for r in BRIDGE_RULES) + "  }\n}\n")


def forward_chain() -> str:
    return ("  chain forward {\n    type filter hook forward priority filter - 5; policy accept;\n"
            + "".join(f"    {x}\n" for x in BASE_RULES) + "  }\n")


def transaction(text: str) -> str:
    """Replace both tables in one transaction: never a moment with a partial or missing ruleset."""
    return (f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n" + text)
