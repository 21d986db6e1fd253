"""Curriculum: the difficulty rule at its boundaries, statistics, the training-set files."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.prompting import load_prompt
from core.settings import Settings, load_settings
from learner.cli import register
from learner.curriculum import (
    cap_openers,
    compute_stats,
    cumulative_training_files,
    held_out_part,
    is_difficult_dialogue,
    is_difficult_turn,
    is_held_out,
    load_training_set,
    personas_for_iteration,
    preference_pairs,
    select_iteration,
    sft_examples,
)
from learner.records import Attempt, DialogueRecord, Score, TokenCounts, TurnRecord
from learner.store import CorpusStore
from storage.db import Database


def S(rel, int_, val) -> Score:
    return Score(rel=rel, int=int_, val=val, reasons={"rel": "r", "int": "i", "val": "v"})


def T(first, final=None, regens=0, index=2, first_reply="first", final_reply=None) -> TurnRecord:
    final = first if final is None else final
    return TurnRecord(
        index=index,
        user_message=f"user says {index}",
        first_reply=first_reply,
        first_score=S(*first),
        final_reply=final_reply or (first_reply if regens == 0 else "better"),
        final_score=S(*final),
        regenerations=regens,
        user_answer=f"answer {index}",
    )


@pytest.mark.parametrize(
    ("turn", "difficult"),
    [
        (T((3, 3, 3)), False),  # exactly alpha everywhere: not below
        (T((5, 5, 2)), True),  # one final score below alpha
        (T((2, 3, 3)), True),
        (T((1, 1, 1), (4, 4, 1), regens=1), True),  # improved 2 but val < alpha
        (T((2, 2, 3), (4, 4, 3), regens=1), False),  # improved exactly beta = 2
        (T((2, 3, 3), (4, 3, 3), regens=2), True),  # improved 1 < beta
        (T((3, 3, 3), (3, 3, 3), regens=3), True),  # regenerated, nothing improved
        (T((4, 3, 4)), False),  # not regenerated: the improvement test does not apply
        (T((3, 3, 3), (5, 5, 5), regens=1), False),
    ],
)
def test_difficulty_rule_boundaries(turn: TurnRecord, difficult: bool) -> None:
    assert is_difficult_turn(turn, alpha=3, beta=2) is difficult


def test_difficulty_rule_is_configurable_and_unscored_is_difficult() -> None:
    turn = T((3, 3, 3))
    assert is_difficult_turn(turn, alpha=4, beta=2)
    regen = T((2, 3, 3), (4, 3, 3), regens=1)
    assert not is_difficult_turn(regen, alpha=3, beta=1)
    unscored = TurnRecord(2, "u", "a", Score(), "a", Score(raw="garbage"))
    assert is_difficult_turn(unscored)
    dialogue = DialogueRecord("d", "p", "P", status="done", turns=[T((4, 4, 4)), turn])
    assert not is_difficult_dialogue(dialogue)
    dialogue.turns.append(T((4, 4, 2), index=4))
    assert is_difficult_dialogue(dialogue)


def _dialogue(did: str, pid: str, turns: list[TurnRecord], status: str = "done"):
    return DialogueRecord(
        id=did,
        persona_id=pid,
        persona_name=pid.upper(),
        status=status,
        cause="critic: timeout" if status == "failed" else None,
        greeting="Hello there!",
        user_intro=f"I'm {pid}.",
        turns=turns,
        tokens=TokenCounts(10, 5, 20),
    )


def _corpus() -> list[DialogueRecord]:
    easy = _dialogue(
        "d-easy",
        "p1",
        [
            T((4, 4, 4), index=2),
            T((2, 2, 4), (4, 4, 4), regens=1, index=3, first_reply="meh"),
        ],
    )
    hard = _dialogue(
        "d-hard",
        "p2",
        [T((2, 3, 3), (4, 3, 3), regens=2, index=2, first_reply="bad"), T((4, 4, 4), index=3)],
    )
    failed = _dialogue("d-failed", "p3", [], status="failed")
    return [easy, hard, failed]


def test_compute_stats_on_hand_built_corpus() -> None:
    stats = compute_stats(_corpus(), iteration=1)
    assert (stats.dialogues, stats.done, stats.failed) == (3, 2, 1)
    assert stats.failure_causes == {"critic": 1}
    assert stats.turns == 4
    assert stats.regenerated_turns == 2
    assert stats.regenerations == 3
    assert stats.regeneration_rate == 0.5
    assert stats.avg_regenerations == 0.75
    assert stats.easy == 1 and stats.easy_rate == 0.5
    assert stats.first_means.rel == pytest.approx((4 + 2 + 2 + 4) / 4)
    assert stats.final_means.rel == pytest.approx(4.0)
    assert stats.final_means.int == pytest.approx((4 + 4 + 3 + 4) / 4)
    assert stats.unscored == 0
    assert stats.tokens == TokenCounts(30, 15, 60)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(env={}, data_dir=tmp_path / "data")


@pytest.fixture
def store(settings: Settings) -> Iterator[CorpusStore]:
    db = Database.from_settings(settings)
    yield CorpusStore(db)
    db.dispose()


def _store_corpus(store: CorpusStore, iteration: int = 1) -> str:
    run, _ = store.open_run(iteration, split="train", config={}, models={})
    for position, d in enumerate(_corpus()):
        store.begin_dialogue(run.id, position, d)
        store.save_opening(d)
        for turn in d.turns:
            store.save_turn(d, turn, 4)
        store.finish_dialogue(d)
    return run.id


def test_select_writes_the_training_set_contract(store: CorpusStore, settings: Settings) -> None:
    run_id = _store_corpus(store)
    result = select_iteration(store, settings.runs_dir, 1)
    out = settings.runs_dir / "iter-001"
    assert result.output_dir == out
    system = str(load_prompt("upc_system"))

    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    # One example per bot turn of the easy dialogue, the loss on that reply only; the
    # greeting is context, never a target.
    assert [(r["dialogue_id"], r["turn"], r["loss"]) for r in sft] == [
        ("d-easy", 2, "last"),
        ("d-easy", 3, "last"),
    ]
    assert all(r["persona_id"] == "p1" for r in sft)
    assert [m["role"] for m in sft[0]["messages"]] == ["system", "assistant", "user", "assistant"]
    roles = [m["role"] for m in sft[1]["messages"]]
    assert roles == ["system", "assistant", "user", "assistant", "user", "assistant"]
    assert sft[1]["messages"][0]["content"] == system
    assert sft[1]["messages"][1]["content"] == "Hello there!"
    assert sft[0]["messages"][-1]["content"] == "first"
    assert sft[1]["messages"][5]["content"] == "better"  # the best attempt
    assert (out / "heldout.jsonl").read_text() == ""  # one easy dialogue: nothing held out

    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    # d-easy turn 3: best (4,4,4) vs worst (2,2,4), a gap of 1.33; d-hard turn 2's gap is
    # 0.67, under the minimum of 1.
    assert len(pairs) == 1
    pair = pairs[0]
    assert set(pair) == {
        "pair_id",
        "dialogue_id",
        "prompt",
        "chosen",
        "rejected",
        "rejected_capped",
    }
    assert (pair["chosen"], pair["rejected"]) == ("better", "meh")
    assert pair["prompt"][-1] == {"role": "user", "content": "answer 2"}
    assert [m["role"] for m in pair["prompt"]] == [
        "system",
        "assistant",
        "user",
        "assistant",
        "user",
    ]

    selection = json.loads((out / "selection.json").read_text())
    assert selection["iteration"] == 1 and selection["alpha"] == 3 and selection["beta"] == 2
    assert selection["counts"]["easy"] == 1 and selection["counts"]["failed"] == 1
    assert selection["easy_dialogue_ids"] == ["d-easy"]
    assert selection["difficult_dialogue_ids"] == ["d-hard"]
    assert selection["pending_persona_ids"] == ["p2", "p3"]
    expected_hash = hashlib.sha256(b"d-easy").hexdigest()
    assert selection["ids_sha256"] == expected_hash
    assert selection["stats"]["regeneration_rate"] == 0.5

    training = load_training_set(settings.runs_dir, 1)
    assert training.dialogue_ids == ["d-easy"] and training.ids_hash == expected_hash
    assert training.sft == sft and training.pairs == pairs

    state = store.curriculum(1)
    assert state is not None and state.run_id == run_id
    assert state.pending_persona_ids == ["p2", "p3"]


def test_tampered_training_set_is_refused(store: CorpusStore, settings: Settings) -> None:
    _store_corpus(store)
    select_iteration(store, settings.runs_dir, 1)
    (settings.runs_dir / "iter-001" / "sft.jsonl").write_text("")
    with pytest.raises(ValueError, match="ids hash"):
        load_training_set(settings.runs_dir, 1)
    with pytest.raises(FileNotFoundError, match="upc learn select"):
        load_training_set(settings.runs_dir, 2)


def test_select_refuses_missing_or_unfinished_runs(store: CorpusStore, settings: Settings) -> None:
    with pytest.raises(ValueError, match="no generation run"):
        select_iteration(store, settings.runs_dir, 5)
    run, _ = store.open_run(2, split="train", config={}, models={})
    store.begin_dialogue(run.id, 0, _dialogue("d-x", "px", [], status="running"))
    with pytest.raises(ValueError, match="unfinished"):
        select_iteration(store, settings.runs_dir, 2)


class _P:
    def __init__(self, pid: str):
        self.id, self.name, self.background = pid, pid, f"{pid} background"


def test_pending_users_come_first_next_iteration(store: CorpusStore, settings: Settings) -> None:
    _store_corpus(store)
    select_iteration(store, settings.runs_dir, 1)
    pool = [_P(f"p{i}") for i in range(1, 9)]
    chosen = [p.id for p in personas_for_iteration(pool, store, 2, 4, seed=3)]
    assert chosen[:2] == ["p2", "p3"]
    assert set(chosen[2:]) <= {"p4", "p5", "p6", "p7", "p8"}  # never-engaged users next
    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert chosen == [p.id for p in personas_for_iteration(pool, store, 2, 4, seed=3)]


def test_cli_select(store: CorpusStore, settings: Settings, capsys) -> None:
    _store_corpus(store)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="group"))
    args = parser.parse_args(["learn", "select", "--iteration", "1", "--alpha", "4"])
    assert args.func(args, settings) == 0
    out = capsys.readouterr().out
    assert "regeneration rate" in out and "37.7%" in out
    selection = json.loads((settings.runs_dir / "iter-001" / "selection.json").read_text())
    assert selection["alpha"] == 4
    assert selection["counts"]["easy"] == 1  # d-easy's final scores are all 4
    args = parser.parse_args(["learn", "select", "--iteration", "9"])
    assert args.func(args, settings) == 2


def test_pairs_take_the_best_and_worst_recorded_attempts() -> None:
    turn = T((2, 2, 2), (4, 4, 5), regens=2, index=2, first_reply="so so")
    turn.final_reply = "great reply"
    turn.attempts = [
        Attempt("first", "so so", S(2, 2, 2)),
        Attempt("resample", "great reply", S(4, 4, 5)),
        Attempt(
            "regen", "Here is a better response: ...", S(1, 1, 1), flags=("meta",), usable=False
        ),
        Attempt("regen", "fine", S(3, 3, 3)),
    ]
    dialogue = _dialogue("d1", "p1", [turn])
    [pair] = preference_pairs(dialogue, "sys", min_gap=1.0)
    # The unusable meta reply is never chosen but is the natural rejected one.
    assert (pair.chosen, pair.rejected) == ("great reply", "Here is a better response: ...")
    assert not pair.rejected_capped
    assert preference_pairs(dialogue, "sys", min_gap=3.5) == []


def test_a_rejected_reply_cut_at_the_cap_is_marked() -> None:
    turn = T((1, 1, 1), (4, 4, 4), regens=1, index=2)
    turn.attempts = [
        Attempt("first", "Engines are loud. I", S(1, 1, 1), "length"),
        Attempt("resample", "Which engine do you fix most?", S(4, 4, 4), "stop"),
    ]
    [pair] = preference_pairs(_dialogue("d1", "p1", [turn]), "sys", min_gap=1.0)
    assert pair.rejected == "Engines are loud. I" and pair.rejected_capped
    assert pair.to_dict()["rejected_capped"] is True


def test_held_out_split_is_stable_and_near_the_ratio() -> None:
    ids = [f"dialogue-{i}" for i in range(2000)]
    held = [i for i in ids if is_held_out(i, 0.1)]
    assert 150 < len(held) < 250
    assert held == [i for i in ids if is_held_out(i, 0.1)]
    assert not any(is_held_out(i, 0.0) for i in ids)
    assert held_out_part(ids, 0.1) == held  # the split itself, when some are left to train


def test_a_small_iteration_never_holds_out_every_dialogue() -> None:
    # The ids of a real worker run whose three easy dialogues all hashed under 0.1.
    ids = [
        "493aa3725429426499182094426f4237",
        "c803b964ea2141e095c092910506d21d",
        "e617334aa730407ab84f4c34a6688905",
    ]
    assert all(is_held_out(i, 0.1) for i in ids)
    held = held_out_part(ids, 0.1)
    assert len(held) == 2 and set(held) < set(ids)
    assert held == held_out_part(ids, 0.1)  # the same one trains every time
    assert held_out_part(ids[:1], 0.1) == [] and held_out_part([], 0.1) == []


def test_cumulative_training_files_join_every_iteration(settings: Settings) -> None:
    for k, rows in ((1, ["a", "b"]), (2, ["c"])):
        d = settings.runs_dir / f"iter-{k:03d}"
        d.mkdir(parents=True)
        (d / "sft.jsonl").write_text("".join(json.dumps({"x": r}) + "\n" for r in rows))
        (d / "heldout.jsonl").write_text(json.dumps({"x": f"h{k}"}) + "\n")
    train, held = cumulative_training_files(settings.runs_dir, 2)
    assert [json.loads(x)["x"] for x in train.read_text().splitlines()] == ["a", "b", "c"]
    assert [json.loads(x)["x"] for x in held.read_text().splitlines()] == ["h1", "h2"]


def test_flagged_replies_are_never_targets_unless_allowed() -> None:
    good = T((4, 4, 4), index=2, first_reply="A whole reply.")
    good.attempts = [Attempt("first", "A whole reply.", S(4, 4, 4))]
    cut = T((4, 4, 4), index=3, first_reply="and then the")
    cut.attempts = [Attempt("first", "and then the", S(4, 4, 4), "length", ("truncated",), False)]
    dialogue = _dialogue("d1", "p1", [good, cut])
    assert [r["turn"] for r in sft_examples(dialogue, "sys")] == [2]
    assert [r["turn"] for r in sft_examples(dialogue, "sys", skip_flagged=False)] == [2, 3]


def test_cap_openers_keeps_the_best_scoring_share_per_opening():
    def row(text, score):
        return {"score": score, "messages": [{"role": "assistant", "content": text}]}

    rows = [row(f"I'm so glad {i}.", float(i)) for i in range(8)]
    rows += [row("Which bike is it?", 1.0), row("Tell me more.", 2.0)]
    kept = cap_openers(rows, 0.2)
    glad = [r for r in kept if r["messages"][-1]["content"].startswith("I'm so glad")]
    assert [r["score"] for r in glad] == [6.0, 7.0]  # ceil(0.2 * 10) = 2, the best two
    assert len(kept) == 4
    assert cap_openers(rows, 1.0) == rows


def test_replies_cut_at_the_cap_are_never_targets_nor_chosen() -> None:
    natural = T((4, 4, 4), index=2, first_reply="Which bikes do you restore?")
    natural.attempts = [Attempt("first", "Which bikes do you restore?", S(4, 4, 4), "stop")]
    capped = T((5, 5, 5), index=3, first_reply="I love engines. They are great.")
    capped.final_finish_reason = "length"  # trimmed to its last sentence, still usable
    capped.attempts = [
        Attempt("first", "I love engines. They are great.", S(5, 5, 5), "length"),
        Attempt("resample", "Do you ride them too?", S(4, 4, 4), "stop"),
        Attempt("regen", "Here is my answer again.", S(1, 1, 1), "stop"),
    ]
    dialogue = _dialogue("d1", "p1", [natural, capped])
    assert [r["turn"] for r in sft_examples(dialogue, "sys")] == [2]
    [pair] = preference_pairs(dialogue, "sys", min_gap=1.0)
    assert (pair.chosen, pair.rejected) == ("Do you ride them too?", "Here is my answer again.")
    # With the checks off (other languages, random test models) a capped reply may train.
    assert [r["turn"] for r in sft_examples(dialogue, "sys", skip_flagged=False)] == [2, 3]


def test_an_easy_dialogue_with_only_capped_replies_loads(
    store: CorpusStore, settings: Settings
) -> None:
    run_id = _store_corpus(store)
    capped = T((5, 5, 5), index=2, first_reply="I love engines. They are great.")
    capped.final_finish_reason = "length"
    capped.attempts = [Attempt("first", "I love engines. They are great.", S(5, 5, 5), "length")]
    d = _dialogue("d-capped", "p4", [capped])
    store.begin_dialogue(run_id, 3, d)
    store.save_opening(d)
    store.save_turn(d, capped, 4)
    store.finish_dialogue(d)
    select_iteration(store, settings.runs_dir, 1)
    selection = json.loads((settings.runs_dir / "iter-001" / "selection.json").read_text())
    # Easy by the critic, but no reply of it may be a target: it gives no training row.
    assert "d-capped" in selection["easy_dialogue_ids"]
    assert "d-capped" not in selection["sft_dialogue_ids"]
    loaded = load_training_set(settings.runs_dir, 1)
    assert {r["dialogue_id"] for r in loaded.sft} == {"d-easy"}
    sft = settings.runs_dir / "iter-001" / "sft.jsonl"
    sft.write_text(sft.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="ids hash"):  # same ids, a row fewer
        load_training_set(settings.runs_dir, 1)
