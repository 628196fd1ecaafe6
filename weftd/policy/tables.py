"""The policy tables in the kernel (`inet weft_policy`, `bridge weft_policy`): every nftables call the policy
engine makes, to put a ruleset in, read its drop counters, list it as the kernel holds it and remove it, and
the bridge setting the tables need to see pod-to-pod frames.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from weftd.policy.layout import TABLE, transaction
from weftd.policy.ruleset import Change
from weftlib.kernel import nft, nftelements, sysctl

log = logging.getLogger("weftd.policy")
FAMILIES = ("inet", "bridge")
BRIDGE_SYSCTLS = ("/proc/sys/net/bridge/bridge-nf-call-iptables", "/proc/sys/net/bridge/bridge-nf-call-ip6tables")


def enable_br_netfilter() -> None:
    """Bridged pod-to-pod frames reach the inet forward hook only with br_netfilter on (in this netns)."""
    for path in BRIDGE_SYSCTLS:
        try:
            if sysctl.write(path, "1", missing_ok=False):
                log.info("enabled %s for NetworkPolicy on same-node traffic", path.rsplit("/", 1)[1])
        except FileNotFoundError:
            log.error("br_netfilter is not loaded (%s missing): policy between pods on the same node is NOT "
                      "enforced; load it with `modprobe br_netfilter`", path)
            return
    log.info("br_netfilter: bridge-nf-call-iptables and bridge-nf-call-ip6tables are on")


def replace(text: str) -> str | None:
    """Both tables replaced by the ruleset `text` in one transaction; None, or why nft refused it."""
    status, _, err = nft.run(transaction(text))
    return None if status == 0 else err.strip()


def change(c: Change) -> str | None:
    """A change to the tables as they are, in one transaction; None, or why the kernel refused it. Element
    changes alone go over netlink (nftelements), anything else through libnftables."""
    if c.elements is not None:
        return nftelements.apply(c.elements)
    if not c.commands:
        return None
    status, _, err = nft.run(c.commands)
    return None if status == 0 else err.strip()


def read_counters(names: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """Packets and bytes of every named counter in the policy tables (one per pod chain, and `spoofed`), or
    of the pod chains `names` (none: no call; one listing costs about as much as one counter)."""
    out: dict[str, tuple[int, int]] = {}
    wanted = None if names is None else set(names)
    for family in FAMILIES if wanted is None else ("inet",) if wanted else ():
        status, text, _ = nft.run(f"list counters table {family} {TABLE}", json_output=True)
        if status != 0:
            continue
        for item in json.loads(text).get("nftables", []):
            c = item.get("counter")
            if c is not None and (wanted is None or c["name"] in wanted):
                out[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
    return out


def listing() -> str:
    """Both policy tables as the kernel has them, without handles and counter values (which change), in an
    order that does not depend on how they were built (in full, or change by change): objects by kind and
    name, rules in their chain's order, set elements sorted."""
    out = []
    for family in FAMILIES:
        status, text, _ = nft.run(f"list table {family} {TABLE}", json_output=True)
        if status != 0:
            out.append(f"{family}: missing")
            continue
        items: list[tuple[tuple[str, str, int], str]] = []
        position: dict[str, int] = {}
        for item in json.loads(text).get("nftables", []):
            kind, body = next(iter(item.items()))
            if kind in ("metainfo", "counter"):
                continue
            body = {k: v for k, v in body.items() if k != "handle"}
            if isinstance(body.get("elem"), list):
                body["elem"] = sorted(body["elem"], key=lambda e: json.dumps(e, sort_keys=True))
            if kind == "rule":
                chain = str(body.get("chain", ""))
                position[chain] = position.get(chain, 0) + 1
                key = ("rule", chain, position[chain])
            else:
                key = (kind, str(body.get("name", "")), 0)
            items.append((key, json.dumps({kind: body}, sort_keys=True)))
        out += [f"{family} {line}" for _, line in sorted(items)]
    return "\n".join(out)


def remove_tables() -> None:
    """`weftd uninstall`: the policy tables go with everything else weftd made."""
    for family in FAMILIES:
        nft.run(f"delete table {family} {TABLE}")
