"""The transactions the incremental ruleset sends leave the kernel's policy tables exactly as replacing them in
full with the same ruleset does, change after change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import Lab
from tests.unit.test_policy import random_steps
from tests.unit.test_policy_ruleset import Changes, Mirror, churn, fresh
from weftd.policy import tables
from weftd.policy.compile import transaction
from weftd.policy.tables import listing
from weftlib.kernel import nft
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
