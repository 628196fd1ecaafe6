"""The node's NAT rules in nftables: one table, fixed rules, and sets that say whom they apply to.

Table `inet weft` holds a handful of rules that never change, keyed on sets:

- `masq_nets4/6`: networks whose traffic is masqueraded when it leaves all of them (weftd's
  per-network NAT, Flannel's IPMasq); `fwd_nets4/6`: the networks weftd serves, with or without NAT.
- `masq_pods4/6`: pod addresses masqueraded when they leave their own subnet (the plugin's per-pod
  `ipMasq`), with `pod_local4/6`: (pod address . pod subnet) pairs that stay unmasqueraded.

Attaching or detaching a pod adds or deletes set elements, never rules: a set element is a small
kernel commit, whereas a rule change rebuilds the chain (8-24 ms). Every element carries its
owner in its comment (the plugin's owner tag, or weftd's), and only the owner's own elements are
ever deleted, so the plugin, weftd and GC never remove each other's, nor anything Weft did not add.
Packets marked by kube-proxy (0x4000) are left to kube-proxy's own masquerade.

No forward chain: in nftables an `accept` ends only its own base chain, and another table's chain
on the same hook still sees the packet and can drop it, so a chain of accepts (Flannel's nftables
mode has one) lets nothing through that would not pass anyway; it only cost every forwarded pod
packet a set lookup, about 3% of the CPU of a host-gw pod-to-pod stream (bench/dataplane_bench.py).
Declaring the table deletes the forward chain that a node upgraded from an earlier Weft still has in it.
Legacy iptables nodes keep weftd's WEFT-FWD chain (weftd/netfilter.py), where an ACCEPT in FORWARD
does count.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from weftlib.kernel import nft

FAMILY = "inet"
TABLE = "weft"
POSTROUTING = "postrouting"
FORWARD = "forward"
KUBE_PROXY_MARK = "0x4000"
_FAM = {4: ("ip", "ipv4_addr", "224.0.0.0/4"), 6: ("ip6", "ipv6_addr", "ff00::/8")}

# Kinds of element: name of the set per IP version.
MASQ_NETS = "masq_nets"
FWD_NETS = "fwd_nets"
MASQ_PODS = "masq_pods"
POD_LOCAL = "pod_local"
_INTERVAL = (MASQ_NETS, FWD_NETS, POD_LOCAL)


class NatError(RuntimeError):
    """nftables refused a change, or libnftables is missing."""


def _nft(script: str, json_output: bool = False) -> tuple[int, str, str]:
    try:
        return nft.run(script, json_output)
    except nft.Unavailable as e:
        raise NatError(str(e)) from None


def _sets() -> list[str]:
    out = []
    for v, (_, addr, _) in _FAM.items():
        for kind in (MASQ_NETS, FWD_NETS, MASQ_PODS, POD_LOCAL):
            typ = f"{addr} . {addr}" if kind == POD_LOCAL else addr
            flags = " flags interval;" if kind in _INTERVAL else ""
            out.append(f"add set {FAMILY} {TABLE} {kind}{v} {{ type {typ};{flags} }}\n")
    return out


def _rules() -> dict[str, list[str]]:
    post = [f"meta mark & {KUBE_PROXY_MARK} == {KUBE_PROXY_MARK} return"]
    for v, (p, _, mcast) in _FAM.items():
        post += [f"{p} daddr {mcast} return",
                 f"{p} saddr @{MASQ_NETS}{v} {p} daddr @{MASQ_NETS}{v} return",
                 f"{p} saddr @{MASQ_NETS}{v} masquerade fully-random",
                 f"{p} saddr . {p} daddr @{POD_LOCAL}{v} return",
                 f"{p} saddr @{MASQ_PODS}{v} masquerade"]
    return {POSTROUTING: post}


def declare() -> str:
    """The nft script that makes the table, sets, chains and rules exactly as above, keeping every
    element: replayable at any time, and applied in one transaction with whatever follows it."""
    chain = f"add chain {FAMILY} {TABLE}"
    out = [f"add table {FAMILY} {TABLE}\n", *_sets(),
           f"{chain} {POSTROUTING} {{ type nat hook postrouting priority srcnat; policy accept; }}\n",
           # An upgraded node's forward chain (see above) goes in the same transaction; a no-op without one.
           f"{chain} {FORWARD}\n", f"flush chain {FAMILY} {TABLE} {FORWARD}\n",
           f"delete chain {FAMILY} {TABLE} {FORWARD}\n"]
    for chain, rules in _rules().items():
        out.append(f"flush chain {FAMILY} {TABLE} {chain}\n")
        out += [f"add rule {FAMILY} {TABLE} {chain} {r}\n" for r in rules]
    return "".join(out)


@dataclass(frozen=True)
class Element:
    """One set element: its set, its value as nft writes it, and its owner (the comment)."""

    set: str
    value: str
    owner: str

    def command(self, verb: str) -> str:
        comment = f' comment "{self.owner}"' if verb == "add" else ""
        return f"{verb} element {FAMILY} {TABLE} {self.set} {{ {self.value}{comment} }}\n"


def pod_elements(owner: str, addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface]) -> list[Element]:
    """What masquerades a pod's addresses when they leave their own subnet."""
    out = []
    for a in addresses:
        out += [Element(f"{MASQ_PODS}{a.version}", str(a.ip), owner),
                Element(f"{POD_LOCAL}{a.version}", f"{a.ip} . {a.network}", owner)]
    return out


def network_elements(owner: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network,
                     masquerade: bool) -> list[Element]:
    """weftd's elements for a network it serves: the record of it, and NAT when traffic leaves it."""
    out = [Element(f"{FWD_NETS}{network.version}", str(network), owner)]
    if masquerade:
        out.append(Element(f"{MASQ_NETS}{network.version}", str(network), owner))
    return out


def run(script: str) -> tuple[bool, str]:
    """(succeeded, error text) of a script, as one transaction."""
    status, _, err = _nft(script)
    return status == 0, err.strip()


def add(elements: list[Element]) -> None:
    """Adds elements (re-adding one is harmless). The table is declared only when the elements cannot be
    added, or its NAT chain is gone: declaring costs a kernel commit of its rules, which adding does not."""
    script = "".join(e.command("add") for e in elements)
    ok, _ = run(script) if script else (False, "")
    if ok and _nft(f"list chain {FAMILY} {TABLE} {POSTROUTING}")[0] == 0:
        return
    ok, err = run(declare() + script)
    if not ok:
        raise NatError(f"adding NAT set elements: {err}")


def _value(v: Any) -> str:
    """An element's value from nft's JSON (an address, a prefix or a concatenation) as nft's syntax."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and "prefix" in v:
        return f"{v['prefix']['addr']}/{v['prefix']['len']}"
    if isinstance(v, dict) and "concat" in v:
        return " . ".join(_value(x) for x in v["concat"])
    if isinstance(v, dict) and "range" in v:
        return "-".join(_value(x) for x in v["range"])
    raise NatError(f"unexpected set element {v!r}")


@dataclass(frozen=True)
class Listing:
    """What the table holds: its elements, and its chains' rules (None if the table is missing)."""

    elements: list[Element]
    rules: dict[str, list[Any]] | None


def listing() -> Listing:
    status, out, _ = _nft(f"list table {FAMILY} {TABLE}", True)
    if status != 0:
        return Listing([], None)
    try:
        items = json.loads(out).get("nftables", [])
    except ValueError:
        raise NatError("nft printed unreadable JSON") from None
    elements: list[Element] = []
    rules: dict[str, list[Any]] = {}
    for item in items:
        if "set" in item:
            s = item["set"]
            for e in s.get("elem", []):
                if isinstance(e, dict) and "elem" in e:
                    elements.append(Element(s["name"], _value(e["elem"]["val"]), str(e["elem"].get("comment", ""))))
        elif "chain" in item:
            rules.setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            # Handles change on every declaration; what the rules do is what counts.
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"]["expr"])
    return Listing(elements, rules)


def owned(owner: str) -> list[Element]:
    return [e for e in listing().elements if e.owner == owner]


def delete(elements: list[Element]) -> None:
    """Deletes elements; one deleted meanwhile by someone else (a racing DEL or GC) is no error."""
    for _ in range(2):
        if not elements:
            return
        ok, err = run("".join(e.command("delete") for e in elements))
        if ok:
            return
        # The transaction was refused as a whole: try again with what is still there.
        elements = [e for e in listing().elements if e in set(elements)]
    raise NatError(f"deleting NAT set elements: {err}")


def remove_owned(owner: str) -> None:
    """Deletes every element of `owner`."""
    delete(owned(owner))


def remove_table_if_unused() -> bool:
    """Deletes the whole table when no element of anyone's is left in it (uninstall); True if it did."""
    now = listing()
    if now.rules is None or now.elements:
        return False
    return run(f"delete table {FAMILY} {TABLE}\n")[0]
