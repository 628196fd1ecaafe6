"""Outbound NAT and forwarding for the pod network, in whichever netfilter mode the node uses.

Pod traffic leaving the cluster networks (one per enabled family) is masqueraded;
pod-to-pod traffic never is, nor multicast (224.0.0.0/4, ff00::/8). On nodes in nft mode
these are weftd's elements in the node's NAT table
(`inet weft`, weftlib.kernel.nat), whose fixed rules the plugin's per-pod ipMasq
shares (no forward chain: an nftables accept cannot override another chain's drop,
see there); on nodes in legacy mode, Weft's own chains through python-iptables:
WEFT-POSTRTG, and WEFT-FWD, which accepts forwarding for the pod networks. The
mode is detected as Kubernetes documents it (kubelet's KUBE-IPTABLES-HINT or
KUBE-KUBELET-CANARY chain in the mangle table), and the two are never mixed:
applying one mode removes Weft's rules of the other.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import netaddr

from weftlib.kernel import nat, nft

log = logging.getLogger("weftd.netfilter")
KUBE_PROXY_MARK = nat.KUBE_PROXY_MARK
_HINT = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)\s", re.M)
_SEARCH = "/usr/sbin:/sbin:/usr/bin:/bin"


class NetfilterError(RuntimeError):
    """The rules could not be read or written (nftables refused, libnftables or iptables missing)."""


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

    def __init__(self, networks: list[netaddr.IPNetwork], masquerade: bool) -> None:
        self.networks = networks
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
    """weftd's elements in the node's NAT table (weftlib.kernel.nat), which the plugin's ipMasq shares."""

    mode = "nft"
    OWNER = "weftd"

    def _wanted(self) -> set[nat.Element]:
        return {e for n in self.networks
                for e in nat.network_elements(self.OWNER, ipaddress.ip_network(str(n)), self.masquerade)}

    _applied: dict[str, list[Any]] | None = None

    def ensure(self) -> bool:
        try:
            now = nat.listing()
            mine = {e for e in now.elements if e.owner == self.OWNER}
            if self._applied is not None and now.rules == self._applied and mine == self._wanted():
                return False
            # One transaction: the table declared again (its rules exactly, elements kept), ours corrected.
            script = nat.declare() + "".join(e.command("delete") for e in mine - self._wanted())
            script += "".join(e.command("add") for e in self._wanted() - mine)
            ok, err = nat.run(script)
            if not ok:
                raise NetfilterError(f"nft: {err}")
            self._applied = nat.listing().rules
        except nat.NatError as e:
            raise NetfilterError(str(e)) from None
        return True

    def present(self) -> bool:
        try:
            return bool(nat.owned(self.OWNER))
        except nat.NatError:
            return False

    def remove(self) -> None:
        try:
            nat.remove_owned(self.OWNER)
        except nat.NatError as e:
            raise NetfilterError(str(e)) from None


class LegacyRules(Rules):
    """python-iptables drives libiptc, which is legacy x_tables only: exactly the legacy-mode case.

    IPv6 goes through ip6tables-legacy-restore instead: libxtables registers an extension (MASQUERADE)
    for the family current when its library is first loaded, and never again, so once python-iptables
    has used a target for IPv4 in a process it refuses every IPv6 rule using it ("invalid rule").
    """

    mode = "legacy"
    NAT_CHAIN = "WEFT-POSTRTG"
    FWD_CHAIN = "WEFT-FWD"
    COMMENT = "weft"

    _MCAST: ClassVar[dict[int, str]] = {4: "224.0.0.0/4", 6: "ff00::/8"}
    _TOOLS: ClassVar[dict[int, str]] = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}

    def _rules(self, version: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """One family's chains (iptables or ip6tables): its network's rules; empty chains for a disabled family."""
        tag = {"comment": {"comment": self.COMMENT}}
        post = [{"mark": {"mark": f"{KUBE_PROXY_MARK}/{KUBE_PROXY_MARK}"}, "target": "RETURN", **tag}]
        fwd = []
        for n in self.networks:
            if n.version != version:
                continue
            c = str(n)
            if self.masquerade:
                post += [{"src": c, "dst": c, "target": "RETURN", **tag},
                         {"src": c, "dst": self._MCAST[version], "target": "RETURN", **tag},
                         {"src": c, "target": {"MASQUERADE": {"random-fully": ""}}, **tag}]
            fwd += [{"src": c, "target": "ACCEPT", **tag}, {"dst": c, "target": "ACCEPT", **tag}]
        return {("nat", self.NAT_CHAIN): post, ("filter", self.FWD_CHAIN): fwd}

    def _versions(self) -> list[int]:
        return sorted({n.version for n in self.networks})

    _HOOKS: ClassVar[dict[str, str]] = {"nat": "POSTROUTING", "filter": "FORWARD"}

    def ensure(self) -> bool:
        changed = []
        if 4 in self._versions():
            with _iptc() as easy:
                changed.append(self._ensure(easy))
        if 6 in self._versions():
            changed.append(self._ensure6())
        for v in {4, 6} - set(self._versions()):
            if self._present(v):  # a family turned off
                self._remove_family(v)
                changed.append(True)
        return any(changed)

    def _ensure(self, easy: Any) -> bool:
        changed = False
        for (table, chain), rules in self._rules(4).items():
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

    def _present(self, version: int) -> bool:
        # Asked through the CLI, with no -t: importing python-iptables, or naming a table, would load
        # legacy x_tables modules on a node that does not use them.
        saved = _save(self._TOOLS[version])
        return f":{self.NAT_CHAIN} " in saved or f":{self.FWD_CHAIN} " in saved

    def present(self) -> bool:
        return self._present(4) or self._present(6)

    def remove(self) -> None:
        for version in (4, 6):
            if self._present(version):
                self._remove_family(version)

    def _remove_family(self, version: int) -> None:
        if version == 6:
            self._remove6()
            return
        with _iptc() as easy:
            self._remove(easy)

    def _remove(self, easy: Any) -> None:
        for (table, chain), _ in self._rules(4).items():
            if not easy.has_chain(table, chain):
                continue
            for r in easy.dump_chain(table, self._HOOKS[table]):
                if r.get("target") == chain:
                    easy.delete_rule(table, self._HOOKS[table], r)
            easy.delete_chain(table, chain, flush=True)


    # --- IPv6, through ip6tables-legacy-save and -restore

    @staticmethod
    def _line(chain: str, rule: dict[str, Any]) -> str:
        """A rule as ip6tables-legacy-save prints it."""
        out = [f"-A {chain}"]
        out += [f"-s {rule['src']}"] if "src" in rule else []
        out += [f"-d {rule['dst']}"] if "dst" in rule else []
        out += [f"-m mark --mark {rule['mark']['mark']}"] if "mark" in rule else []
        out += [f"-m comment --comment {rule['comment']['comment']}"] if "comment" in rule else []
        target = rule["target"]
        if isinstance(target, dict):
            (name, opts), = target.items()
            out += [f"-j {name}", *(f"--{k}" + (f" {v}" if v else "") for k, v in opts.items())]
        else:
            out.append(f"-j {target}")
        return " ".join(out)

    def _jump(self, table: str, chain: str) -> str:
        return f"-A {self._HOOKS[table]} -m comment --comment {self.COMMENT} -j {chain}"

    def _ensure6(self) -> bool:
        script = []
        for (table, chain), rules in self._rules(6).items():
            saved = _save("ip6tables-legacy-save", "-t", table).splitlines()
            want = [self._line(chain, r) for r in rules]
            have = [line for line in saved if line.startswith(f"-A {chain} ")]
            jump = self._jump(table, chain) in saved
            if f":{chain} " in "\n".join(saved) and have == want and jump:
                continue
            script += [f"*{table}", f":{chain} - [0:0]", *want]  # --noflush still flushes a declared chain
            if not jump:
                script.append(self._jump(table, chain).replace("-A ", "-I ", 1).replace(" -m ", " 1 -m ", 1))
            script.append("COMMIT")
        if not script:
            return False
        _restore6("\n".join(script) + "\n")
        return True

    def _remove6(self) -> None:
        script = []
        for (table, chain), _ in self._rules(6).items():
            saved = _save("ip6tables-legacy-save", "-t", table).splitlines()
            if f":{chain} " not in "\n".join(saved):
                continue
            jumps = [line for line in saved if line.startswith(f"-A {self._HOOKS[table]} ") and
                     line.endswith(f" -j {chain}")]
            script += [f"*{table}", *(line.replace("-A ", "-D ", 1) for line in jumps), f"-F {chain}", f"-X {chain}",
                       "COMMIT"]
        if script:
            _restore6("\n".join(script) + "\n")


def _restore6(script: str) -> None:
    exe = shutil.which("ip6tables-legacy-restore", path=_SEARCH)
    if exe is None:
        raise NetfilterError("ip6tables-legacy-restore is missing: install the Debian package iptables")
    p = subprocess.run([exe, "--noflush"], input=script, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise NetfilterError(f"ip6tables-legacy-restore: {p.stderr.strip()}")


@contextmanager
def _iptc() -> Iterator[Any]:
    """python-iptables' `easy` module, with its failures as NetfilterError."""
    try:
        import iptc
        from iptc import easy
    except (ImportError, OSError) as e:
        raise NetfilterError(f"python-iptables cannot load libiptc: {e}") from None
    try:
        yield easy
    except (iptc.IPTCError, iptc.XTablesError, OSError) as e:
        raise NetfilterError(f"iptables: {e}") from None


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


def rules_for(mode: str, networks: list[netaddr.IPNetwork], masquerade: bool) -> Rules:
    return (NftRules if mode == "nft" else LegacyRules)(networks, masquerade)


# The nftables tables that a node upgraded from Weft's earlier layout still holds, whose rules `inet weft`
# (weftlib.kernel.nat) makes: weftd's NAT and forward chains (`ip weft`), and the plugin's ipMasq rules, one per
# pod address, each with its owner's tag in its comment (`inet weft_masq`). Left in place, they would apply a
# second time. By table: its chains as Weft made them, name -> (type, hook).
OLD_TABLES: dict[tuple[str, str], dict[str, tuple[str, str]]] = {
    ("ip", "weft"): {"postrouting": ("nat", "postrouting"), "forward": ("filter", "forward")},
    ("inet", "weft_masq"): {"postrouting": ("nat", "postrouting")},
}
OLD_MASQ_TAG = "weft:"


def _made_by_weft(family: str, name: str, items: list[dict[str, Any]]) -> bool:
    """Whether a listed old table holds only what Weft put there: its chains, and in weft_masq tagged rules."""
    chains = OLD_TABLES[(family, name)]
    for item in items:
        kind, obj = next(iter(item.items()))
        if kind in ("metainfo", "table"):
            continue
        if kind == "chain" and (obj.get("type"), obj.get("hook")) == chains.get(obj.get("name")):
            continue
        if kind == "rule" and (name != "weft_masq" or str(obj.get("comment", "")).startswith(OLD_MASQ_TAG)):
            continue
        return False
    return True


def remove_old_tables() -> list[str]:
    """Deletes the tables of Weft's earlier layout that hold only what Weft made; the ones it deleted. A table
    by one of those names that holds anything else is not Weft's to delete, and stays (with a warning)."""
    removed: list[str] = []
    for family, name in OLD_TABLES:
        try:
            status, out, _ = nft.run(f"list table {family} {name}", json_output=True)
            if status != 0:
                continue  # not there
            items = json.loads(out).get("nftables", [])
            if not _made_by_weft(family, name, items):
                log.warning("leaving nftables table %s %s alone: it holds more than Weft's earlier layout made",
                            family, name)
                continue
            status, _, err = nft.run(f"delete table {family} {name}")
        except nft.Unavailable:
            return removed  # no nftables here: no old tables either
        except ValueError:
            raise NetfilterError(f"nft printed unreadable JSON for table {family} {name}") from None
        if status != 0:
            raise NetfilterError(f"deleting table {family} {name}: {err.strip()}")
        removed.append(f"{family} {name}")
    return removed


def install(networks: list[netaddr.IPNetwork], masquerade: bool, mode: str | None = None) -> Rules:
    """Rules for the node's mode, after removing any Weft left in the other mode or in its earlier layout."""
    for table in remove_old_tables():
        log.info("removed nftables table %s of Weft's earlier layout", table)
    mode = mode or detect_mode()
    other = rules_for("legacy" if mode == "nft" else "nft", networks, masquerade)
    if other.present():
        log.warning("removing weft's %s rules: this node now uses %s", other.mode, mode)
        other.remove()
    rules = rules_for(mode, networks, masquerade)
    rules.ensure()
    log.info("netfilter mode %s: NAT for %s %s", mode, " ".join(map(str, networks)), "on" if masquerade else "off")
    return rules


def uninstall() -> None:
    """Removes weftd's rules in both modes, and the node's NAT table if no pod's elements are left in it."""
    for mode in ("nft", "legacy"):
        rules = rules_for(mode, [], True)
        if rules.present():
            rules.remove()
    try:
        nat.remove_table_if_unused()
    except nat.NatError as e:
        raise NetfilterError(str(e)) from None
