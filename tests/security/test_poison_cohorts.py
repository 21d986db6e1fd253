"""Issue 16's poisoned logged dialogues, quick: a 30 % and a 51 % troll cohort among 10
users go through the real worker (critique, guard, retrain, a gate forced open); nothing a
troll wrote reaches a promoted adapter's training data (`bench/chaos/poison.py` runs 10,
30 and 51 % of 100 users)."""

from __future__ import annotations

import pytest

from tests.security.poison import run_cohort

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("share", [0.3, 0.51])
def test_no_troll_turn_reaches_a_promoted_adapter(tmp_path, tiny_model_dir, share):
    result = run_cohort(tmp_path, tiny_model_dir, share, users=10, seed=5)
    assert result.trolls == (3 if share == 0.3 else 6)
    assert result.promoted, "nothing was promoted: the check would be vacuous"
    assert result.examples_in_promoted > 0
    assert result.poisoned_in_promoted == 0 and result.troll_turns_in_promoted == 0, result
    assert result.user_recall == 1.0 and result.user_precision == 1.0, result
