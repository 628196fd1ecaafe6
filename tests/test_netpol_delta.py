"""The transactions the incremental ruleset sends leave the kernel's policy tables exactly as replacing them in
full with the same ruleset does, change after change."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import netaddr
import pytest

from ipam.reservations import Reservations
from tests.lab import Lab
from tests.unit.test_policy import random_steps
from tests.unit.test_policy_drops import Objects, deny, pod
from tests.unit.test_policy_ruleset import Changes, Mirror, churn, fresh
from weftd.pod import Attachment
from weftd.policy import tables
from weftd.policy.bindings import Ports
from weftd.policy.compile import transaction
from weftd.policy.engine import PolicyEngine
from weftd.policy.layout import PortBinding
from weftd.policy.ruleset import Change
from weftd.policy.tables import listing
from weftlib.kernel import nft
from weftlib.kernel.netlink import host_veth_name
from weftlib.kernel.netns import NetNS


@pytest.mark.parametrize("seed", range(4))
def test_changes_alone_give_the_tables_a_full_replace_gives(tmp_path: Path, seed: int) -> None:
    lab = Lab(tmp_path)
    try:
        by_change, by_full = (NetNS(lab.netns(label).path) for label in ("change", "full"))
        mirror = Mirror()
        changes = alone = 0
        for step, raw in enumerate(random_steps(seed, 30)):
            change = mirror.follow(raw)
            with by_change.entered():
                err = tables.replace(mirror.ruleset.render()) if step == 0 else tables.change(change)
                assert err is None, f"step {step}: {err}\n{change.commands}"
                idle = mirror.ruleset.flush(idle=True)  # the chains no pod uses, which a full replace leaves out
                assert tables.change(idle) is None, f"step {step}: {idle.commands}"
                got = listing()
            changes += bool(change.commands)
            alone += change.elements is not None
            with by_full.entered():
                status, _, err = nft.run(transaction(fresh(mirror.objects).render()))
                assert status == 0, err
                want = listing()
            assert got == want, f"step {step}"
        assert changes >= 10 and alone >= 3  # some of them as elements alone, over netlink
        by_change.close()
        by_full.close()
    finally:
        lab.close()


def test_a_thousand_changes_at_scale_give_the_tables_a_full_replace_gives(tmp_path: Path) -> None:
    """1,000 random changes to 1,500 pods and 80 policies, five at a time as one transaction; the listings
    compared every 100 changes and at the end."""
    lab = Lab(tmp_path)
    try:
        by_change, by_full = (NetNS(lab.netns(label).path) for label in ("change", "full"))
        mirror = Mirror()
        batch: Changes = {}
        alone = 0
        for step, (what, changes) in enumerate(churn(7, 1500, 80, 1000)):
            batch.update(changes)
            if step % 5 and step != 1000:
                continue
            change = mirror.change(batch)
            batch = {}
            with by_change.entered():
                err = tables.replace(mirror.ruleset.render()) if step == 0 else tables.change(change)
                assert err is None, f"step {step} ({what}): {err}\n{change.commands}"
                alone += change.elements is not None
                if step % 100 and step != 1000:
                    continue
                idle = mirror.ruleset.flush(idle=True)
                assert tables.change(idle) is None, f"step {step}: {idle.commands}"
                got = listing()
            with by_full.entered():
                status, _, err = nft.run(transaction(fresh(mirror.objects).render()))
                assert status == 0, err
                want = listing()
            assert got == want, f"step {step}"
        assert alone >= 50  # of 200 transactions, as elements alone over netlink
        by_change.close()
        by_full.close()
    finally:
        lab.close()


def test_the_hooks_change_only_their_pods_veth_and_a_resync_finds_the_same_tables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pods attached and detached through the CNI server's hook: each ADD and DEL reads no reservation and
    goes to the kernel as elements alone; the tables then equal the resync's full replace, which reads every
    reservation, also after a reservation made behind the hook's back (a pod attached while weftd was away)."""
    lab = Lab(tmp_path)
    reservations = Reservations(str(tmp_path / "ipam"), "weft")
    reads = 0
    full_read = Ports.bindings

    def counted(self: Ports) -> list[PortBinding]:
        nonlocal reads
        reads += 1
        return full_read(self)

    monkeypatch.setattr(Ports, "bindings", counted)
    try:
        node = NetNS(lab.netns("node").path)
        with node.entered():
            source = Objects(deny([]), pod("db0", "10.1.9.9", "other", {"app": "db"}))
            engine = PolicyEngine("me", source, tmp_path / "pods.json", Path(reservations.dir), resync=3600)
            engine.subnets = (netaddr.IPNetwork("10.0.0.0/16"), netaddr.IPNetwork("fd00::/64"))
            engine.refresh()
            engine.request()
            engine.ready.set()
            assert reads == 1  # the first apply reads every reservation
            reads = 0

            def attach(i: int, name: str) -> None:
                cid = f"{i:064x}"
                addrs = (ipaddress.ip_interface(f"10.0.0.{i}/16"), ipaddress.ip_interface(f"fd00::{i:x}/64"))
                with reservations as held:
                    for a in addrs:
                        held.reserve(a.ip, cid, "eth0")
                engine.attached(Attachment("x", name, cid, "eth0", host_veth_name(cid, "eth0"), addrs))

            def detach(i: int) -> None:
                with reservations as held:
                    for ip in (f"10.0.0.{i}", f"fd00::{i:x}"):
                        held.release(ipaddress.ip_address(ip))
                engine.detached(f"{i:064x}")

            sent: list[Change] = []
            real_change = tables.change

            def change(c: Change) -> str | None:
                sent.append(c)
                return real_change(c)

            monkeypatch.setattr(tables, "change", change)
            for i in range(1, 9):  # the first makes its chain; the rest are elements alone
                attach(i, f"db{i}" if i % 2 else f"web{i}")
            for i in (2, 5, 8):
                detach(i)
            attach(5, "db5")  # the same pod again, under its old veth name
            assert reads == 0 and len(sent) == 12
            assert sum(c.elements is not None for c in sent) >= 10, [c.commands for c in sent]
            listed = tables.listing()
            assert all(host_veth_name(f"{i:064x}", "eth0") in listed for i in (1, 3, 4, 5, 6, 7))
            assert not any(host_veth_name(f"{i:064x}", "eth0") in listed for i in (2, 8))
            assert engine._resync() and reads == 1
            assert tables.listing() == listed  # (idle chains aside, which neither holds here)

            with reservations as held:  # attached while weftd was away: no hook told of it
                held.reserve(ipaddress.ip_address("10.0.0.30"), f"{30:064x}", "eth0")
            attach(9, "web9")
            assert host_veth_name(f"{30:064x}", "eth0") not in tables.listing()
            assert engine._resync()
            assert host_veth_name(f"{30:064x}", "eth0") in tables.listing()
        node.close()
    finally:
        lab.close()
