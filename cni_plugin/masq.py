"""ipMasq: masquerade a pod's traffic that leaves its subnet.

Rules live in Weft's own nftables table, one rule per pod address, each with a
comment naming its owner (network, container, ifname) by hash. DEL and GC find
rules by that tag, so they work without the pod's addresses, which the
reference bridge needs and loses when the netns is gone (plugins#810).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable

from cni_plugin import errors, nft
from cni_plugin.errors import CniError

FAMILY = "inet"
TABLE = "weft_masq"
CHAIN = "postrouting"
_MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}


def _h(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def network_tag(network: str) -> str:
    return f"weft:{_h(network)}:"


def owner_tag(network: str, container_id: str, ifname: str) -> str:
    return f"{network_tag(network)}{_h(container_id + '/' + ifname)}"


def _nft(script: str, json_output: bool = False) -> tuple[int, str, str]:
    try:
        return nft.run(script, json_output)
    except nft.Unavailable as e:
        raise CniError(errors.INTERNAL, f"ipMasq: {e}") from None


def add(network: str, container_id: str, ifname: str,
        addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface]) -> None:
    tag = owner_tag(network, container_id, ifname)
    rules = []
    for a in addresses:
        fam = "ip" if a.version == 4 else "ip6"
        rules.append(f"add rule {FAMILY} {TABLE} {CHAIN} {fam} saddr {a.ip} {fam} daddr != {a.network} "
                     f"{fam} daddr != {_MULTICAST[a.version]} masquerade comment \"{tag}\"\n")
    # Declaring the chain again costs a 12 ms kernel commit even when it exists, so only on the
    # first rule (or after the table was removed); `add` makes racing first ADDs harmless.
    status, _, err = _nft("".join(rules))
    if status != 0:
        status, _, err = _nft(f"add table {FAMILY} {TABLE}\n"
                                 f"add chain {FAMILY} {TABLE} {CHAIN} "
                                 "{ type nat hook postrouting priority srcnat; policy accept; }\n" + "".join(rules))
    if status != 0:
        raise CniError(errors.INTERNAL, f"adding masquerade rules: {err.strip()}")


def _rules() -> list[dict[str, object]]:
    status, out, _ = _nft(f"list chain {FAMILY} {TABLE} {CHAIN}", json_output=True)
    if status != 0:
        return []  # no table or chain: nothing of ours exists
    try:
        items = json.loads(out).get("nftables", [])
    except ValueError:
        raise CniError(errors.INTERNAL, "nft printed unreadable JSON") from None
    return [i["rule"] for i in items if isinstance(i, dict) and "rule" in i]


def _delete(handles: list[object]) -> None:
    if not handles:
        return
    script = "".join(f"delete rule {FAMILY} {TABLE} {CHAIN} handle {h}\n" for h in handles)
    status, _, err = _nft(script)
    if status != 0:
        raise CniError(errors.INTERNAL, f"deleting masquerade rules: {err.strip()}")


def owned(network: str, container_id: str, ifname: str) -> list[dict[str, object]]:
    tag = owner_tag(network, container_id, ifname)
    return [r for r in _rules() if r.get("comment") == tag]


def remove(network: str, container_id: str, ifname: str) -> None:
    _delete([r["handle"] for r in owned(network, container_id, ifname)])


def collect(network: str, valid: Iterable[tuple[str, str]]) -> None:
    """Removes this network's rules whose owner is not a valid attachment."""
    keep = {owner_tag(network, cid, ifn) for cid, ifn in valid}
    prefix = network_tag(network)
    _delete([r["handle"] for r in _rules()
             if isinstance(r.get("comment"), str) and str(r["comment"]).startswith(prefix)
             and r["comment"] not in keep])
