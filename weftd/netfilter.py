"""Outbound NAT and forwarding for the pod network, in whichever netfilter mode the node uses.

Pod traffic leaving the cluster network is masqueraded; pod-to-pod traffic
never is; forwarding is accepted for the pod network. Rules live in Weft's own
nftables table (`ip weft`) on nodes in nft mode, and in Weft's own chains
(WEFT-POSTRTG, WEFT-FWD) through python-iptables on nodes in legacy mode. The
mode is detected as Kubernetes documents it (kubelet's KUBE-IPTABLES-HINT or
KUBE-KUBELET-CANARY chain in the mangle table), and the two are never mixed:
applying one mode removes Weft's rules of the other.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import netaddr

from cni_plugin import nft

log = logging.getLogger("weftd.netfilter")
KUBE_PROXY_MARK = "0x4000"
_HINT = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)\s", re.M)
_SEARCH = "/usr/sbin:/sbin:/usr/bin:/bin"


def _nft(script: str, json_output: bool = False) -> tuple[int, str, str] | None:
    """(status, output, error) of an nft script run in-process; None without libnftables."""
    try:
        return nft.run(script, json_output)
    except nft.Unavailable:
        return None


def _save(cmd: str, *args: str) -> str:
    exe = shutil.which(cmd, path=_SEARCH)
    if exe is None:
        return ""
    p = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    return p.stdout if p.returncode == 0 else ""


def detect_mode() -> str:
    """'nft' or 'legacy': the mode kubelet uses, or else the one holding more rules (kind's rule)."""
    mangle = _save("iptables-nft-save", "-t", "mangle")
    if _HINT.search(mangle):
        return "nft"
    legacy = _save("iptables-legacy-save")  # no -t mangle: that would create the table
    if _HINT.search(legacy):
        return "legacy"
    count = lambda text: sum(1 for line in text.splitlines() if line.startswith("-"))  # noqa: E731
    return "legacy" if count(legacy) > count(_save("iptables-nft-save")) else "nft"


class Rules(ABC):
    mode: str

    def __init__(self, network: netaddr.IPNetwork, masquerade: bool) -> None:
        self.network = network
        self.masquerade = masquerade

    @abstractmethod
    def ensure(self) -> bool:
        """Makes the rules exactly as wanted; True if anything had to change."""

    @abstractmethod
    def remove(self) -> None:
        """Removes every rule of Weft's in this mode."""

    @abstractmethod
    def present(self) -> bool:
        """Whether any of Weft's rules exist in this mode."""


class NftRules(Rules):
    mode = "nft"
    TABLE = "weft"

    def _script(self) -> str:
        c = str(self.network)
        masq = (f"ip saddr {c} ip daddr {c} return\n"
                f"ip saddr {c} ip daddr 224.0.0.0/4 return\n"
                f"ip saddr {c} masquerade fully-random\n") if self.masquerade else ""
        return (f"table ip {self.TABLE} {{\n"
                f" chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n"
                f"  meta mark & {KUBE_PROXY_MARK} == {KUBE_PROXY_MARK} return\n{masq} }}\n"
                f" chain forward {{\n  type filter hook forward priority filter; policy accept;\n"
                f"  ip saddr {c} accept\n  ip daddr {c} accept\n }}\n}}\n")

    def _listing(self) -> Any:
        p = _nft(f"list table ip {self.TABLE}", json_output=True)
        if p is None or p[0] != 0:
            return None
        items = json.loads(p[1]).get("nftables", [])
        # Handles change on every apply; compare what the rules do.
        return [{k: v for k, v in next(iter(i.values())).items() if k != "handle"} for i in items
                if "rule" in i or "chain" in i]

    _applied: Any = None

    def ensure(self) -> bool:
        if self._applied is not None and self._listing() == self._applied:
            return False
        self._apply()
        return True

    def present(self) -> bool:
        p = _nft(f"list table ip {self.TABLE}")
        return p is not None and p[0] == 0

    def _apply(self) -> None:
        p = _nft(f"add table ip {self.TABLE}\ndelete table ip {self.TABLE}\n" + self._script())
        if p is None:
            raise RuntimeError("nftables is not installed (libnftables.so.1)")
        if p[0] != 0:
            raise RuntimeError(f"nft: {p[2].strip()}")
        self._applied = self._listing()

    def remove(self) -> None:
        _nft(f"delete table ip {self.TABLE}")


class LegacyRules(Rules):
    """python-iptables drives libiptc, which is legacy x_tables only: exactly the legacy-mode case."""

    mode = "legacy"
    NAT_CHAIN = "WEFT-POSTRTG"
    FWD_CHAIN = "WEFT-FWD"
    COMMENT = "weft"

    def _rules(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        c = str(self.network)
        tag = {"comment": {"comment": self.COMMENT}}
        nat = [{"mark": {"mark": f"{KUBE_PROXY_MARK}/{KUBE_PROXY_MARK}"}, "target": "RETURN", **tag}]
        if self.masquerade:
            nat += [{"src": c, "dst": c, "target": "RETURN", **tag},
                    {"src": c, "dst": "224.0.0.0/4", "target": "RETURN", **tag},
                    {"src": c, "target": {"MASQUERADE": {"random-fully": ""}}, **tag}]
        fwd = [{"src": c, "target": "ACCEPT", **tag}, {"dst": c, "target": "ACCEPT", **tag}]
        return {("nat", self.NAT_CHAIN): nat, ("filter", self.FWD_CHAIN): fwd}

    _HOOKS: ClassVar[dict[str, str]] = {"nat": "POSTROUTING", "filter": "FORWARD"}

    def ensure(self) -> bool:
        from iptc import easy

        changed = False
        for (table, chain), rules in self._rules().items():
            jump = {"target": chain, **{"comment": {"comment": self.COMMENT}}}
            if not easy.has_chain(table, chain):
                easy.add_chain(table, chain)
                changed = True
            if [_norm(r) for r in easy.dump_chain(table, chain)] != [_norm(r) for r in rules]:
                easy.flush_chain(table, chain)
                for r in rules:
                    easy.add_rule(table, chain, r)
                changed = True
            if not any(_norm(r) == _norm(jump) for r in easy.dump_chain(table, self._HOOKS[table])):
                easy.insert_rule(table, self._HOOKS[table], jump)
                changed = True
        return changed

    def present(self) -> bool:
        # Asked through the CLI, with no -t: importing python-iptables, or naming a table, would load
        # legacy x_tables modules on a node that does not use them.
        saved = _save("iptables-legacy-save")
        return f":{self.NAT_CHAIN} " in saved or f":{self.FWD_CHAIN} " in saved

    def remove(self) -> None:
        from iptc import easy

        for (table, chain), _ in self._rules().items():
            if not easy.has_chain(table, chain):
                continue
            for r in easy.dump_chain(table, self._HOOKS[table]):
                if r.get("target") == chain:
                    easy.delete_rule(table, self._HOOKS[table], r)
            easy.delete_chain(table, chain, flush=True)


def _norm(rule: dict[str, Any]) -> str:
    """python-iptables prints addresses with masks and targets as dicts; compare a canonical form."""
    out = dict(rule)
    for key in ("src", "dst"):
        if key in out:
            out[key] = str(netaddr.IPNetwork(out[key]).cidr)
    if isinstance(out.get("target"), str):
        out["target"] = {out["target"]: ""}
    out.pop("counters", None)
    return json.dumps(out, sort_keys=True)


def rules_for(mode: str, network: netaddr.IPNetwork, masquerade: bool) -> Rules:
    return (NftRules if mode == "nft" else LegacyRules)(network, masquerade)


def install(network: netaddr.IPNetwork, masquerade: bool, mode: str | None = None) -> Rules:
    """Rules for the node's mode, after removing any Weft left in the other mode."""
    mode = mode or detect_mode()
    other = rules_for("legacy" if mode == "nft" else "nft", network, masquerade)
    if other.present():
        log.warning("removing weft's %s rules: this node now uses %s", other.mode, mode)
        other.remove()
    rules = rules_for(mode, network, masquerade)
    rules.ensure()
    log.info("netfilter mode %s: NAT for %s %s", mode, network, "on" if masquerade else "off")
    return rules
