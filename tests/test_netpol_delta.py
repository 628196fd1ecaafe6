"""The change-only nftables transaction an ADD or DEL sends leaves the kernel's policy tables exactly as
replacing them in full with the same ruleset does, change after change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import Lab
from tests.unit.test_policy import compile_raw, random_steps
from weftd.policy.compile import Cache, delta, transaction
from weftd.policy.tables import listing
from weftlib.kernel import nft
from weftlib.kernel.netns import NetNS


@pytest.mark.parametrize("seed", range(4))
def test_changes_alone_give_the_tables_a_full_replace_gives(tmp_path: Path, seed: int) -> None:
    lab = Lab(tmp_path)
    try:
        by_delta, by_full = (NetNS(lab.netns(label).path) for label in ("delta", "full"))
        cache = Cache()
        last = None
        deltas = 0
        for step, raw in enumerate(random_steps(seed, 30)):
            compiled = compile_raw(raw, cache)
            change = delta(last, compiled) if last is not None else None
            with by_delta.entered():
                if change is None:
                    assert last is None, f"step {step}: no delta between two rulesets of the same node"
                    status, _, err = nft.run(transaction(compiled.text))
                else:
                    deltas += 1
                    status, _, err = nft.run(change.commands) if change.commands else (0, "", "")
                assert status == 0, f"step {step}: {err}\n{change.commands if change else ''}"
                got = listing()
            with by_full.entered():
                status, _, err = nft.run(transaction(compiled.text))
                assert status == 0, err
                want = listing()
            assert got == want, f"step {step}"
            last = compiled
        assert deltas >= 25
        by_delta.close()
        by_full.close()
    finally:
        lab.close()
