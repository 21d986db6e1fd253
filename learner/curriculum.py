"""Curriculum selection (the data side of Algorithm 2) and per-iteration statistics.

A turn is difficult when any final score is below ``alpha``, or when it was regenerated and
fewer than ``beta`` dimensions improved from the first attempt to the final reply. An
unscored final reply counts as difficult (nothing shows it is good). A dialogue is easy iff
no turn is difficult. Each turn of an easy dialogue becomes one SFT example: the dialogue
before it under the serving system prompt as context, the loss on that reply alone (the
greeting is not trained). A stable 10% of easy dialogues is held out for a held-out loss.
Every turn whose best and worst attempts differ by at least ``pair_min_gap`` (mean score)
gives a preference pair (chosen = best, rejected = worst); users with difficult or failed
dialogues are engaged again next iteration.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.prompting import load_prompt
from learner.records import (
    DIMENSIONS,
    Attempt,
    DialogueRecord,
    DimensionMeans,
    IterationStats,
    PersonaLike,
    PreferencePair,
    TokenCounts,
    TurnRecord,
)
from learner.reply_checks import opener
from learner.store import CorpusStore, CurriculumState, RunInfo

__all__ = [
    "SelectionResult",
    "TrainingSet",
    "compute_stats",
    "copy_recorded_pairs",
    "cumulative_training_files",
    "is_difficult_dialogue",
    "is_difficult_turn",
    "is_held_out",
    "iteration_dir",
    "load_training_set",
    "personas_for_iteration",
    "preference_pairs",
    "select_iteration",
    "sft_examples",
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


def sft_examples(
    dialogue: DialogueRecord, system_prompt: str, *, skip_flagged: bool = True
) -> list[dict[str, Any]]:
    """One example per scored bot turn: the dialogue before it, the loss on that reply only.

    A reply the reply checks flagged as unusable, or one cut at the token cap, is never a
    target (``skip_flagged``)."""
    messages = dialogue.messages(system_prompt)
    rows = []
    # messages: system, greeting, intro, then (reply, answer) per turn.
    for i, turn in enumerate(dialogue.turns):
        usable = next((a.usable for a in turn.attempts if a.reply == turn.final_reply), True)
        if (skip_flagged and not usable) or not turn.final_reply.strip():
            continue
        # A reply cut at the token cap (then trimmed to its last sentence) ended where the
        # cap fell, not where the model chose: such targets halve the questions asked
        # (21% vs 43% in the first GPU corpus) and teach stopping short.
        if skip_flagged and turn.final_finish_reason == "length":
            continue
        rows.append(
            {
                "dialogue_id": dialogue.id,
                "persona_id": dialogue.persona_id,
                "turn": turn.index,
                "loss": "last",
                "score": turn.final_score.mean(),
                "messages": messages[: 3 + 2 * i + 1],
            }
        )
    return rows


def cap_openers(rows: list[dict[str, Any]], max_share: float) -> list[dict[str, Any]]:
    """At most ``max_share`` of the targets may open with the same three words; the
    best-scoring ones stay. The base model opens ~40% of its replies with "I'm so glad",
    and training on that share taught the first adapter to open nearly every reply so."""
    if max_share >= 1.0 or not rows:
        return rows
    limit = max(1, math.ceil(max_share * len(rows)))
    ranked = sorted(range(len(rows)), key=lambda k: -(rows[k].get("score") or 0.0))
    taken: Counter[str] = Counter()
    keep = set()
    for k in ranked:
        start = opener(rows[k]["messages"][-1]["content"])
        if taken[start] < limit:
            taken[start] += 1
            keep.add(k)
    return [row for k, row in enumerate(rows) if k in keep]


def preference_pairs(
    dialogue: DialogueRecord, system_prompt: str, min_gap: float = 1.0
) -> list[PreferencePair]:
    """Chosen = the best usable attempt, rejected = the worst attempt, where they differ by
    at least ``min_gap`` in mean score."""
    pairs = []
    messages = dialogue.messages(system_prompt)
    for i, turn in enumerate(dialogue.turns):
        # Corpora stored before attempts were recorded: the first and final replies.
        attempts = turn.attempts or [
            Attempt("first", turn.first_reply, turn.first_score),
            Attempt("final", turn.final_reply, turn.final_score),
        ]
        scored = [a for a in attempts if a.score.mean() is not None]
        usable = [a for a in scored if a.usable and a.finish_reason != "length"]
        if not usable:
            continue
        best = max(usable, key=lambda a: a.score.mean())  # type: ignore[arg-type, return-value]
        worst = min(scored, key=lambda a: a.score.mean())  # type: ignore[arg-type, return-value]
        if best.reply == worst.reply or best.score.mean() - worst.score.mean() < min_gap:  # type: ignore[operator]
            continue
        pairs.append(
            PreferencePair(
                pair_id=f"{dialogue.id}-t{turn.index}",
                dialogue_id=dialogue.id,
                prompt=messages[: 3 + 2 * i],
                chosen=best.reply,
                rejected=worst.reply,
                rejected_capped=worst.finish_reason == "length",
            )
        )
    return pairs


def is_held_out(dialogue_id: str, ratio: float) -> bool:
    """A stable split by dialogue: the same dialogue is always on the same side."""
    digest = hashlib.sha256(dialogue_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < ratio


def held_out_part(dialogue_ids: Sequence[str], ratio: float) -> list[str]:
    """The ids held out for the held-out loss, by `is_held_out`, but never all of them: a
    small iteration whose every dialogue falls on the held-out side (3 of 3 at ratio 0.1
    happens once in a thousand) still trains, on the one whose hash is highest."""
    if len(dialogue_ids) < 2:
        return []
    held = [i for i in dialogue_ids if is_held_out(i, ratio)]
    if len(held) == len(dialogue_ids):
        keep = max(held, key=lambda i: hashlib.sha256(i.encode("utf-8")).digest()[:4])
        held = [i for i in held if i != keep]
    return held


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


def _targets(
    dialogues: Sequence[DialogueRecord],
    system_prompt: str,
    skip_flagged: bool,
    max_opener_share: float,
) -> list[dict[str, Any]]:
    """The per-turn SFT rows of ``dialogues``, at most ``max_opener_share`` per opening."""
    rows = [
        row for d in dialogues for row in sft_examples(d, system_prompt, skip_flagged=skip_flagged)
    ]
    return cap_openers(rows, max_opener_share)


def _finished_run(store: CorpusStore, iteration: int) -> tuple[RunInfo, list[DialogueRecord]]:
    """The iteration's generation run and its dialogues; an error when it is missing or
    still running."""
    run = store.get_run(iteration)
    if run is None:
        raise ValueError(f"iteration {iteration} has no generation run; run `upc learn generate`")
    dialogues = store.dialogues(run.id)
    if any(d.status == "running" for d in dialogues):
        raise ValueError(
            f"iteration {iteration} is unfinished; resume it with `upc learn generate "
            f"--iteration {iteration}` first"
        )
    return run, dialogues


def select_iteration(
    store: CorpusStore,
    runs_dir: Path,
    iteration: int,
    *,
    alpha: int = 3,
    beta: int = 2,
    accept_threshold: int = 4,
    pair_min_gap: float = 1.0,
    holdout_ratio: float = 0.1,
    skip_flagged: bool = True,
    max_opener_share: float = 0.1,
) -> SelectionResult:
    """Write ``sft.jsonl``, ``heldout.jsonl``, ``pairs.jsonl`` and ``selection.json``."""
    run, dialogues = _finished_run(store, iteration)
    system_prompt = str(load_prompt("upc_system"))
    done = [d for d in dialogues if d.status == "done"]
    easy = [d for d in done if not is_difficult_dialogue(d, alpha, beta)]
    difficult = [d for d in done if is_difficult_dialogue(d, alpha, beta)]
    failed = [d for d in dialogues if d.status == "failed"]
    pairs = [p for d in done for p in preference_pairs(d, system_prompt, pair_min_gap)]
    held = held_out_part([d.id for d in easy], holdout_ratio)
    held_ids = set(held)
    sft, heldout = (
        _targets(part, system_prompt, skip_flagged, max_opener_share)
        for part in (
            [d for d in easy if d.id not in held_ids],
            [d for d in easy if d.id in held_ids],
        )
    )
    # The ids the files hold: an easy dialogue whose every reply hit the cap gives no row.
    training_ids = sorted({row["dialogue_id"] for row in sft} | {p.dialogue_id for p in pairs})
    ids_hash = _ids_hash(training_ids)
    pending = [d.persona_id for d in difficult] + [d.persona_id for d in failed]
    stats = compute_stats(dialogues, iteration, alpha, beta)
    out = iteration_dir(runs_dir, iteration)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "sft.jsonl", _jsonl(sft))
    _write_atomic(out / "heldout.jsonl", _jsonl(heldout))
    _write_atomic(out / "pairs.jsonl", _jsonl([p.to_dict() for p in pairs]))
    selection = {
        "iteration": iteration,
        "run_id": run.id,
        "alpha": alpha,
        "beta": beta,
        "accept_threshold": accept_threshold,
        "pair_min_gap": pair_min_gap,
        "holdout_ratio": holdout_ratio,
        "counts": {
            "dialogues": len(dialogues),
            "done": len(done),
            "failed": len(failed),
            "easy": len(easy),
            "difficult": len(difficult),
            "sft": len(sft),
            "heldout": len(heldout),
            "pairs": len(pairs),
        },
        "easy_dialogue_ids": [d.id for d in easy],
        "heldout_dialogue_ids": sorted(held_ids),
        "sft_dialogue_ids": sorted({row["dialogue_id"] for row in sft}),
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
    # Per-turn rows repeat a dialogue id; an easy dialogue whose every reply hit the cap
    # gives no row. Files written before `sft_dialogue_ids` hold every easy dialogue.
    sft_ids = {r["dialogue_id"] for r in sft}
    expected = selection.get("sft_dialogue_ids")
    if expected is None:
        sft_ids |= set(selection.get("heldout_dialogue_ids", []))
        expected = selection.get("easy_dialogue_ids", [])
    counts = selection.get("counts", {})
    rows_differ = (counts.get("sft", len(sft)), counts.get("pairs", len(pairs))) != (
        len(sft),
        len(pairs),
    )
    if ids_hash != selection.get("ids_sha256") or sft_ids != set(expected) or rows_differ:
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


def cumulative_paths(runs_dir: Path, iteration: int) -> tuple[Path, Path]:
    """Where `cumulative_training_files` writes iteration K's training and held-out sets."""
    out = iteration_dir(runs_dir, iteration)
    return out / "train-all.jsonl", out / "heldout-all.jsonl"


def cumulative_training_files(runs_dir: Path, iteration: int) -> tuple[Path, Path]:
    """Write iteration K's cumulative ``train-all.jsonl`` and ``heldout-all.jsonl``: the
    selected examples of iterations 1..K, for retraining from the base."""
    parts: dict[str, list[str]] = {"sft.jsonl": [], "heldout.jsonl": []}
    for k in range(1, iteration + 1):
        for name, rows in parts.items():
            path = iteration_dir(runs_dir, k) / name
            if path.is_file():
                rows.extend(x for x in path.read_text("utf-8").splitlines() if x.strip())
    train, held = cumulative_paths(runs_dir, iteration)
    _write_atomic(train, "".join(x + "\n" for x in parts["sft.jsonl"]))
    _write_atomic(held, "".join(x + "\n" for x in parts["heldout.jsonl"]))
    return train, held


def copy_recorded_pairs(source: Path, target: Path) -> tuple[int, tuple[str, ...]]:
    """Check preference pairs recorded by a run (JSON lines, plain or gzip) row by row and
    write them to `target` as plain JSON lines; their count and dialogue ids. Errors name
    the file and the line."""
    raw = source.read_bytes()
    try:
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: not UTF-8 JSON lines, plain or gzip ({exc})") from exc
    ids: set[str] = set()
    lines = [line for line in text.splitlines() if line.strip()]
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{n}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= row.keys():
            raise ValueError(f"{source}:{n}: a pair needs prompt, chosen and rejected")
        ids.add(str(row.get("dialogue_id", "")))
    if not lines:
        raise ValueError(f"{source}: no preference pairs")
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(target, "\n".join(lines) + "\n")
    return len(lines), tuple(sorted(ids - {""}))
