"""The promotion gate: a pure decision on built scores, then its recording and promotion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from learner.gate import ScoreSet, decide, run_gate
from learner.records import DialogueRecord, Score, TurnRecord
from learner.registry import AdapterManifest, AdapterRegistry
from storage.adapter_models import GateEvaluationRow
from storage.db import Database


def _scores(adapter_id: str, rel, int_, val, unscored=0) -> ScoreSet:
    """One reply per user u0, u1, ...: each user's mean is that reply's mean score."""
    per_user = tuple(
        (f"u{i}", (r + n + v) / 3) for i, (r, n, v) in enumerate(zip(rel, int_, val, strict=True))
    )
    return ScoreSet(
        adapter_id, tuple(rel), tuple(int_), tuple(val), unscored=unscored, per_user=per_user
    )


def test_better_candidate_is_promoted():
    base = _scores("base", [4, 4, 5, 4, 3, 4], [3, 3, 4, 3, 3, 3], [3, 4, 3, 3, 3, 4])
    cand = _scores("it001", [5, 5, 5, 5, 4, 5], [4, 4, 4, 4, 4, 4], [4, 4, 4, 4, 4, 4])
    decision = decide(cand, base, margin=0.1)
    assert decision.promote
    assert decision.delta == pytest.approx(cand.overall - base.overall)
    assert decision.lower is not None and decision.lower > 0.1 and decision.n_users == 6
    assert decision.lower <= decision.delta <= decision.upper
    assert "promoted" in decision.reason and "int=" in decision.reason
    assert "95% CI" in decision.reason


def test_worse_candidate_is_refused_and_reason_explains():
    base = _scores("it001", [5, 5], [4, 4], [4, 4])
    cand = _scores("it002", [5, 4], [3, 4], [4, 3])
    decision = decide(cand, base, margin=0.0)
    assert not decision.promote
    assert decision.delta < 0
    assert decision.reason.startswith("not promoted")
    assert "it001" in decision.reason


def test_a_higher_mean_without_a_positive_lower_bound_is_refused():
    # One user gains a lot, another loses: the mean rises but the paired interval spans 0.
    base = _scores("base", [3, 4, 4, 4], [3, 4, 4, 4], [3, 4, 4, 4])
    cand = _scores("it001", [5, 3, 4, 4], [5, 3, 4, 4], [5, 3, 4, 4])
    decision = decide(cand, base, margin=0.0)
    assert decision.delta > 0 and decision.lower <= 0
    assert not decision.promote


def test_a_regressed_check_blocks_promotion():
    from learner.checks import CheckRegression

    base = _scores("base", [3] * 5, [3] * 5, [3] * 5)
    cand = _scores("it001", [4] * 5, [4] * 5, [4] * 5)
    regressed = [CheckRegression("truncation_rate", "truncation", "lower", 0.05, 0.2, 3.0)]
    decision = decide(cand, base, margin=0.0, regressed=regressed)
    assert decision.lower == pytest.approx(1.0) and not decision.promote
    assert "truncation" in decision.reason and decision.regressions[0]["key"] == "truncation_rate"


def test_margin_is_enforced_on_the_lower_bound():
    base = _scores("base", [4] * 4, [3] * 4, [3] * 4)
    slightly = _scores("c", [4] * 4, [3] * 4, [3.45] * 4)  # +0.15 for every user
    assert decide(slightly, base, margin=0.1).promote
    assert not decide(slightly, base, margin=0.2).promote


def test_no_scores_never_promotes():
    base = _scores("base", [4], [4], [4])
    empty = _scores("c", [], [], [], unscored=3)
    decision = decide(empty, base, margin=-10.0)
    assert not decision.promote and "no scored replies" in decision.reason
    assert not decide(base, empty, margin=-10.0).promote


def test_users_missing_on_one_side_are_not_compared():
    base = ScoreSet("base", (4.0,), (4.0,), (4.0,), per_user=(("a", 4.0),))
    cand = ScoreSet("it001", (5.0,), (5.0,), (5.0,), per_user=(("b", 5.0),))
    decision = decide(cand, base, margin=0.0)
    assert not decision.promote and decision.n_users == 0


def _dialogue(persona: str, scores: list[tuple[int, int, int]], unscored: int = 0):
    turns = [
        TurnRecord(
            index=i + 2,
            user_message="u",
            first_reply="r",
            first_score=Score(*s),
            final_reply="r",
            final_score=Score(*s),
        )
        for i, s in enumerate(scores)
    ]
    turns += [TurnRecord(len(turns) + 2, "u", "r", Score(), "r", Score()) for _ in range(unscored)]
    return DialogueRecord(id=f"d-{persona}", persona_id=persona, persona_name=persona, turns=turns)


def test_score_set_from_dialogues_skips_unscored():
    s = ScoreSet.from_dialogues("x", [_dialogue("p1", [(5, 4, 3), (3, 2, 1)], unscored=2)])
    assert s.means() == {"rel": 4.0, "int": 3.0, "val": 2.0}
    assert (s.replies, s.unscored, s.dialogues) == (2, 2, 1)


@pytest.fixture
def peft_dir(tmp_path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=128,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules="all-linear"))
    model.save_pretrained(str(tmp_path / "peft"))
    return tmp_path / "peft"


def _runner_with(table: dict[str, tuple[int, int, int]], calls: list):
    """Stands in for `learner.generate.run_dialogues`: fixed scores per adapter."""

    def run(chatbot, user_model, critic, personas, *, turns, regenerate, adapter, seed, batch_size):
        assert batch_size == len(personas)
        calls.append(
            {
                "adapter": adapter,
                "seed": seed,
                "turns": turns,
                "regenerate": regenerate,
                "users": list(personas),
            }
        )
        score = table[adapter or "base"]
        return [_dialogue(p, [score] * (turns - 1)) for p in personas]

    return run


def test_run_gate_records_and_promotes_only_the_better(tmp_path, peft_dir):
    data = tmp_path / "data"
    db = Database(f"sqlite:///{data / 'upc.db'}", data_dir=data)
    registry = AdapterRegistry(data / "adapters", db)
    registry.publish(peft_dir, AdapterManifest(id="good", iteration=1))
    registry.publish(peft_dir, AdapterManifest(id="bad", iteration=2, parent_id="good"))
    calls: list = []
    runner = _runner_with({"base": (4, 3, 3), "good": (5, 4, 4), "bad": (4, 3, 3)}, calls)
    common = {
        "chatbot": None,
        "user_model": None,
        "critic": None,
        "personas": ["v1", "v2"],
        "margin": 0.05,
        "seed": 7,
        "turns": 5,
        "runner": runner,
    }

    first = run_gate(registry, "good", iteration=1, **common)
    assert first.promote and first.baseline_id == "base"
    assert registry.active_id() == "good"
    # Paired: the same users and the same two seeds for candidate and baseline, both seeds
    # in one lockstep batch (a copy of each user per seed).
    assert [c["seed"] for c in calls] == [7, 7] and all(not c["regenerate"] for c in calls)
    assert [c["adapter"] for c in calls] == ["good", None]
    assert all(c["users"] == ["v1", "v2", "v1", "v2"] for c in calls)
    assert first.n_users == 2 and first.seeds == (7, 8) and first.lower == pytest.approx(1.0)

    second = run_gate(registry, "bad", iteration=2, **common)
    assert not second.promote and second.baseline_id == "good"
    assert registry.active_id() == "good"
    bad = registry.get("bad")
    assert bad.status == "candidate" and bad.status_reason.startswith("not promoted")
    stored = json.loads((registry.path("bad") / "manifest.json").read_text())
    assert stored["gate"]["promote"] is False
    assert stored["metrics"]["gate"]["delta"] == pytest.approx(second.delta)
    registry.verify("bad")  # recording the gate keeps the adapter verifiable

    with db.session() as session:
        rows = session.scalars(select(GateEvaluationRow).order_by(GateEvaluationRow.id)).all()
        assert [(r.candidate_id, r.baseline_id, r.promoted) for r in rows] == [
            ("good", "base", True),
            ("bad", "good", False),
        ]
        assert rows[1].details["baseline"]["replies"] == 16  # 2 users x 2 seeds x 4 turns
