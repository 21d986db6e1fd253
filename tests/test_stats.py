"""Per-user means and the paired user bootstrap on synthetic numbers with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from learner.records import DialogueRecord, Score, TurnRecord
from learner.stats import dialogue_mean, paired_bootstrap, per_user_means, per_user_values


def _dialogue(persona: str, scores: list[tuple[int, int, int] | None]) -> DialogueRecord:
    turns = []
    for i, s in enumerate(scores):
        score = Score() if s is None else Score(rel=s[0], int=s[1], val=s[2])
        turns.append(TurnRecord(i + 2, "u", "r", score, "r", score))
    return DialogueRecord(id=f"{persona}-{len(scores)}", persona_id=persona, persona_name=persona,
                          turns=turns)  # fmt: skip


def test_per_user_means_average_over_seeds_then_replies() -> None:
    dialogues = [
        _dialogue("u1", [(4, 4, 4), (2, 2, 2)]),  # dialogue mean 3
        _dialogue("u1", [(5, 5, 5), None]),  # unscored reply skipped: 5
        _dialogue("u2", [(3, 1, 2)]),  # mean(3, 1, 2) = 2
        _dialogue("u3", [None]),  # nothing scored: u3 is absent
    ]
    means = per_user_means(dialogues)
    assert means == pytest.approx({"u1": 4.0, "u2": 2.0})
    assert per_user_means(dialogues, ("rel",)) == pytest.approx({"u1": 4.0, "u2": 3.0})
    # Replacement scores (e.g. a second critic), one list per dialogue.
    other = [[Score(rel=1, int=1, val=1)] * 2, [Score(rel=2, int=2, val=2)] * 2, [], []]
    assert per_user_means(dialogues, scores=other) == pytest.approx({"u1": 1.5})
    with pytest.raises(ValueError):
        per_user_means(dialogues, scores=other[:2])
    assert dialogue_mean([Score()]) is None
    assert per_user_values([("a", 1.0), ("a", None), ("a", 3.0), ("b", None)]) == {"a": 2.0}


def test_constant_shift_gives_a_zero_width_interval_at_the_shift() -> None:
    rng = np.random.default_rng(1)
    base = {f"u{i}": float(v) for i, v in enumerate(rng.uniform(2, 4, size=80))}
    candidate = {k: v + 0.5 for k, v in base.items()}
    ci = paired_bootstrap(candidate, base, n_boot=500, seed=3)
    assert ci.n_users == 80
    assert ci.mean_diff == pytest.approx(0.5)
    assert ci.lo == pytest.approx(0.5) and ci.hi == pytest.approx(0.5)
    assert ci.relative_gain == pytest.approx(0.5 / np.mean(list(base.values())))
    assert ci.significant


def test_pure_noise_gives_an_interval_containing_zero() -> None:
    rng = np.random.default_rng(7)
    users = [f"u{i}" for i in range(200)]
    base = {u: float(v) for u, v in zip(users, rng.normal(3.5, 0.5, 200), strict=True)}
    candidate = {u: float(v) for u, v in zip(users, rng.normal(3.5, 0.5, 200), strict=True)}
    ci = paired_bootstrap(candidate, base, seed=0)
    assert ci.lo < 0.0 < ci.hi and not ci.significant
    # 95% of the normal interval width: sd of a difference is 0.5*sqrt(2), over sqrt(200).
    expected_half = 1.96 * 0.5 * np.sqrt(2) / np.sqrt(200)
    assert (ci.hi - ci.lo) / 2 == pytest.approx(expected_half, rel=0.2)


def test_pairing_beats_an_unpaired_view_when_users_differ_a_lot() -> None:
    # Users differ by +-1.5 but each gains exactly 0.1 +- 0.05: the paired interval is tight.
    rng = np.random.default_rng(11)
    base = {f"u{i}": float(v) for i, v in enumerate(rng.uniform(1.5, 4.5, size=60))}
    candidate = {k: v + 0.1 + float(rng.normal(0, 0.05)) for k, v in base.items()}
    ci = paired_bootstrap(candidate, base, seed=2)
    assert ci.lo > 0.05 and ci.hi < 0.15 and ci.significant


def test_only_common_users_count_and_edge_cases() -> None:
    ci = paired_bootstrap({"a": 4.0, "b": 3.0, "x": 100.0}, {"a": 3.0, "b": 3.0, "y": -5.0})
    assert ci.n_users == 2 and ci.mean_diff == pytest.approx(0.5)
    assert ci.base_mean == pytest.approx(3.0) and ci.candidate_mean == pytest.approx(3.5)
    assert ci.lo >= 0.0 and ci.hi <= 1.0
    assert paired_bootstrap({"a": 1.0}, {"b": 1.0}).mean_diff is None
    one = paired_bootstrap({"a": 2.0}, {"a": 1.5})
    assert (one.mean_diff, one.lo, one.hi, one.n_users) == (0.5, 0.5, 0.5, 1)
    assert paired_bootstrap({"a": 1.0, "b": 2.0}, {"a": 0.0, "b": 0.0}).relative_gain is None
    same = paired_bootstrap({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 0.0, "b": 1.0, "c": 2.0}, seed=5)
    assert same == paired_bootstrap(
        {"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 0.0, "b": 1.0, "c": 2.0}, seed=5
    )
    with pytest.raises(ValueError):
        paired_bootstrap({"a": 1.0}, {"a": 1.0}, confidence=1.0)
    assert set(same.to_dict()) >= {"mean_diff", "lo", "hi", "relative_gain", "significant"}
