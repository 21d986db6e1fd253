"""Curriculum selection (the data side of Algorithm 2) and per-iteration statistics.

A turn is difficult when any final score is below ``alpha``, or when it was regenerated and
fewer than ``beta`` dimensions improved from the first attempt to the final reply. An
unscored final reply counts as difficult (nothing shows it is good). A dialogue is easy iff
no turn is difficult. Easy dialogues become SFT data (accepted replies as targets); every
accepted regeneration gives a preference pair (chosen = regeneration, rejected = first
attempt); users with difficult or failed dialogues are engaged again next iteration.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatbot.prompting import load_prompt
from learner.records import (
    DIMENSIONS,
    DialogueRecord,
    DimensionMeans,
    IterationStats,
    PersonaLike,
    PreferencePair,
    TokenCounts,
    TurnRecord,
)

if TYPE_CHECKING:
    from learner.store import CorpusStore

__all__ = [
    "SelectionResult",
    "TrainingSet",
    "compute_stats",
    "is_difficult_dialogue",
    "is_difficult_turn",
    "iteration_dir",
    "load_training_set",
    "personas_for_iteration",
    "preference_pairs",
    "select_iteration",
    "sft_example",
]


def is_difficult_turn(turn: TurnRecord, alpha: int = 3, beta: int = 2) -> bool:
    final = turn.final_score
    if not final.scored:
        return True
    if any(final.get(d) < alpha for d in DIMENSIONS):  # type: ignore[operator]
        return True
    return turn.regenerations > 0 and turn.improved_dimensions() < beta


def is_difficult_dialogue(dialogue: DialogueRecord, alpha: int = 3, beta: int = 2) -> bool:
    return any(is_difficult_turn(t, alpha, beta) for t in dialogue.turns)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def compute_stats(
    dialogues: Sequence[DialogueRecord], iteration: int, alpha: int = 3, beta: int = 2
) -> IterationStats:
    done = [d for d in dialogues if d.status == "done"]
    failed = [d for d in dialogues if d.status == "failed"]
    turns = [t for d in done for t in d.turns]
    tokens = TokenCounts()
    for d in dialogues:
        tokens.merge(d.tokens)
    first: dict[str, list[float]] = {d: [] for d in DIMENSIONS}
    final: dict[str, list[float]] = {d: [] for d in DIMENSIONS}
    unscored = 0
    for t in turns:
        unscored += int(not t.first_score.scored) + int(
            t.regenerations > 0 and not t.final_score.scored
        )
        for dim in DIMENSIONS:
            if (v := t.first_score.value(dim)) is not None:
                first[dim].append(v)
            if (v := t.final_score.value(dim)) is not None:
                final[dim].append(v)
    regenerated = sum(1 for t in turns if t.regenerations > 0)
    regenerations = sum(t.regenerations for t in turns)
    easy = sum(1 for d in done if not is_difficult_dialogue(d, alpha, beta))
    return IterationStats(
        iteration=iteration,
        dialogues=len(dialogues),
        done=len(done),
        failed=len(failed),
        failure_causes=dict(Counter((d.cause or "unknown").split(":")[0] for d in failed)),
        turns=len(turns),
        regenerated_turns=regenerated,
        regenerations=regenerations,
        regeneration_rate=round(regenerated / len(turns), 4) if turns else 0.0,
        avg_regenerations=round(regenerations / len(turns), 4) if turns else 0.0,
        easy=easy,
        easy_rate=round(easy / len(done), 4) if done else 0.0,
        unscored=unscored,
        first_means=DimensionMeans(**{d: _mean(first[d]) for d in DIMENSIONS}),
        final_means=DimensionMeans(**{d: _mean(final[d]) for d in DIMENSIONS}),
        tokens=tokens,
    )


def sft_example(dialogue: DialogueRecord, system_prompt: str) -> dict[str, Any]:
    messages = dialogue.messages(system_prompt)
    while messages and messages[-1]["role"] == "user":
        messages.pop()  # a trailing user answer has no target
    return {"dialogue_id": dialogue.id, "persona_id": dialogue.persona_id, "messages": messages}


def preference_pairs(
    dialogue: DialogueRecord, system_prompt: str, accept_threshold: int = 4
) -> list[PreferencePair]:
    pairs = []
    messages = dialogue.messages(system_prompt)
    # messages: system, greeting, intro, then (reply, answer) per turn.
    for i, turn in enumerate(dialogue.turns):
        if turn.regenerations == 0 or not turn.accepted(accept_threshold):
            continue
        if turn.final_reply == turn.first_reply:
            continue
        prompt = messages[: 3 + 2 * i]
        pairs.append(
            PreferencePair(
                pair_id=f"{dialogue.id}-t{turn.index}",
                dialogue_id=dialogue.id,
                prompt=prompt,
                chosen=turn.final_reply,
                rejected=turn.first_reply,
            )
        )
    return pairs


def iteration_dir(runs_dir: Path, iteration: int) -> Path:
    return Path(runs_dir) / f"iter-{iteration:03d}"


def _ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@dataclass
class SelectionResult:
    iteration: int
    output_dir: Path
    stats: IterationStats
    easy_ids: list[str]
    difficult_ids: list[str]
    pending_persona_ids: list[str]
    sft_count: int
    pair_count: int
    ids_hash: str


def select_iteration(
    store: CorpusStore,
    runs_dir: Path,
    iteration: int,
    *,
    alpha: int = 3,
    beta: int = 2,
    accept_threshold: int = 4,
) -> SelectionResult:
    """Write ``sft.jsonl``, ``pairs.jsonl`` and ``selection.json`` for iteration K."""
    from learner.store import CurriculumState

    run = store.get_run(iteration)
    if run is None:
        raise ValueError(f"iteration {iteration} has no generation run; run `upc learn generate`")
    dialogues = store.dialogues(run.id)
    if any(d.status == "running" for d in dialogues):
        raise ValueError(
            f"iteration {iteration} is unfinished; resume it with `upc learn generate "
            f"--iteration {iteration}` first"
        )
    system_prompt = str(load_prompt("upc_system"))
    done = [d for d in dialogues if d.status == "done"]
    easy = [d for d in done if not is_difficult_dialogue(d, alpha, beta)]
    difficult = [d for d in done if is_difficult_dialogue(d, alpha, beta)]
    failed = [d for d in dialogues if d.status == "failed"]
    pairs = [p for d in done for p in preference_pairs(d, system_prompt, accept_threshold)]
    sft = [sft_example(d, system_prompt) for d in easy]
    training_ids = sorted({d.id for d in easy} | {p.dialogue_id for p in pairs})
    ids_hash = _ids_hash(training_ids)
    pending = [d.persona_id for d in difficult] + [d.persona_id for d in failed]
    stats = compute_stats(dialogues, iteration, alpha, beta)
    out = iteration_dir(runs_dir, iteration)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "sft.jsonl", _jsonl(sft))
    _write_atomic(out / "pairs.jsonl", _jsonl([p.to_dict() for p in pairs]))
    selection = {
        "iteration": iteration,
        "run_id": run.id,
        "alpha": alpha,
        "beta": beta,
        "accept_threshold": accept_threshold,
        "counts": {
            "dialogues": len(dialogues),
            "done": len(done),
            "failed": len(failed),
            "easy": len(easy),
            "difficult": len(difficult),
            "sft": len(sft),
            "pairs": len(pairs),
        },
        "easy_dialogue_ids": [d.id for d in easy],
        "difficult_dialogue_ids": [d.id for d in difficult],
        "pending_persona_ids": pending,
        "training_dialogue_ids": training_ids,
        "ids_sha256": ids_hash,
        "stats": stats.to_dict(),
    }
    _write_atomic(out / "selection.json", json.dumps(selection, indent=2, ensure_ascii=False))
    store.save_curriculum(
        CurriculumState(
            iteration=iteration,
            run_id=run.id,
            alpha=alpha,
            beta=beta,
            easy_dialogue_ids=[d.id for d in easy],
            difficult_dialogue_ids=[d.id for d in difficult],
            pending_persona_ids=pending,
            ids_hash=ids_hash,
            stats=stats.to_dict(),
            output_dir=str(out),
        )
    )
    return SelectionResult(
        iteration=iteration,
        output_dir=out,
        stats=stats,
        easy_ids=[d.id for d in easy],
        difficult_ids=[d.id for d in difficult],
        pending_persona_ids=pending,
        sft_count=len(sft),
        pair_count=len(pairs),
        ids_hash=ids_hash,
    )


@dataclass
class TrainingSet:
    iteration: int
    sft: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    dialogue_ids: list[str]
    ids_hash: str
    selection: dict[str, Any]


def load_training_set(runs_dir: Path, iteration: int) -> TrainingSet:
    """Read what ``upc learn select --iteration K`` wrote; checks the ids hash."""
    directory = iteration_dir(runs_dir, iteration)
    try:
        selection = json.loads((directory / "selection.json").read_text(encoding="utf-8"))
        sft = [
            json.loads(x) for x in (directory / "sft.jsonl").read_text("utf-8").splitlines() if x
        ]
        pairs = [
            json.loads(x) for x in (directory / "pairs.jsonl").read_text("utf-8").splitlines() if x
        ]
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no training set for iteration {iteration} in {directory}: run `upc learn select`"
        ) from exc
    ids = sorted({r["dialogue_id"] for r in sft} | {p["dialogue_id"] for p in pairs})
    ids_hash = _ids_hash(ids)
    sft_ids = sorted(r["dialogue_id"] for r in sft)
    if ids_hash != selection.get("ids_sha256") or sft_ids != sorted(
        selection.get("easy_dialogue_ids", [])
    ):
        raise ValueError(f"{directory}: training files do not match selection.json (ids hash)")
    return TrainingSet(iteration, sft, pairs, ids, ids_hash, selection)


def personas_for_iteration(
    personas: Sequence[PersonaLike],
    store: CorpusStore,
    iteration: int,
    n: int,
    *,
    seed: int = 0,
) -> list[PersonaLike]:
    """Pending (difficult) users of iteration K-1 first, then users never engaged, then others."""
    by_id = {p.id: p for p in personas}
    chosen: list[PersonaLike] = []
    previous = store.curriculum(iteration - 1) if iteration > 1 else None
    if previous is not None:
        chosen = [by_id[pid] for pid in previous.pending_persona_ids if pid in by_id][:n]
    taken = {p.id for p in chosen}
    used = store.persona_ids()
    rng = random.Random(seed * 7919 + iteration)
    fresh = [p for p in personas if p.id not in used and p.id not in taken]
    rng.shuffle(fresh)
    reused = [p for p in personas if p.id in used and p.id not in taken]
    rng.shuffle(reused)
    for persona in [*fresh, *reused]:
        if len(chosen) >= n:
            break
        chosen.append(persona)
    return chosen
