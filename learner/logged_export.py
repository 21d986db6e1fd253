"""Accepted logged turns into a training run's files: SFT rows (dialogue prefix + accepted
reply) and preference pairs (chosen = regeneration, rejected = original), mixed with the
curriculum's synthetic rows at ``real_data_ratio`` and marked with the run's iteration, so an
example is exported to exactly one run."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update

from learner.logged import LOGGED_PREFIX, eligible_query
from storage.db import Database
from storage.logged_models import LoggedTurnRow

__all__ = ["MixResult", "build_logged_training_set", "mix_counts", "mix_into_training_set"]


def _sft_row(row: LoggedTurnRow, system_prompt: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system_prompt}, *row.prefix]
    messages.append({"role": "assistant", "content": row.final_reply})
    return {
        "dialogue_id": f"{LOGGED_PREFIX}{row.id}",
        "source": "logged",
        # Only the last reply was judged; earlier bot turns are context (see the report).
        "loss": "last",
        "conversation_id": row.conversation_id,
        "user_hash": row.user_hash,
        "critic_model_id": row.critic_model_id,
        "messages": messages,
    }


def _pair_row(row: LoggedTurnRow, system_prompt: str) -> dict[str, Any] | None:
    if row.regenerated is None or row.final_reply == row.original:
        return None
    return {
        "pair_id": f"{LOGGED_PREFIX}{row.id}",
        "dialogue_id": f"{LOGGED_PREFIX}{row.id}",
        "source": "logged",
        "prompt": [{"role": "system", "content": system_prompt}, *row.prefix],
        "chosen": row.final_reply,
        "rejected": row.original,
    }


def mix_counts(n_synthetic: int, n_real: int, ratio: float) -> tuple[int, int]:
    """How many synthetic and real SFT examples to take so real / total ~= ratio.

    The scarcer side is taken whole. With no synthetic corpus at all, real data trains alone.
    """
    ratio = min(1.0, max(0.0, ratio))
    if n_synthetic == 0:
        return 0, n_real
    if ratio == 0.0:
        return n_synthetic, 0
    if ratio == 1.0:
        return 0, n_real
    real_for_all = int(n_synthetic * ratio / (1.0 - ratio))
    if n_real >= real_for_all:
        return n_synthetic, real_for_all
    return min(n_synthetic, round(n_real * (1.0 - ratio) / ratio)), n_real


@dataclass
class MixResult:
    iteration: int
    synthetic: int
    real: int
    pairs_real: int
    turn_ids: list[int]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    os.replace(tmp, path)


def _ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def _finish_files(
    db: Database,
    run_dir: Path,
    iteration: int,
    synthetic_sft: list[dict[str, Any]],
    synthetic_pairs: list[dict[str, Any]],
    chosen: list[LoggedTurnRow],
    system_prompt: str,
    ratio: float,
    selection: dict[str, Any],
) -> MixResult:
    real_sft = [_sft_row(r, system_prompt) for r in chosen]
    real_pairs = [p for r in chosen if (p := _pair_row(r, system_prompt)) is not None]
    sft = [*synthetic_sft, *real_sft]
    pairs = [*synthetic_pairs, *real_pairs]
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(run_dir / "sft.jsonl", sft)
    _write_jsonl(run_dir / "pairs.jsonl", pairs)
    ids = sorted({r["dialogue_id"] for r in sft} | {p["dialogue_id"] for p in pairs})
    selection.update(
        {
            "iteration": iteration,
            "training_dialogue_ids": ids,
            "dialogue_ids": ids,
            # `load_training_set` checks that the SFT rows are exactly these ids.
            "easy_dialogue_ids": [r["dialogue_id"] for r in sft],
            "sft_dialogue_ids": sorted({r["dialogue_id"] for r in sft}),
            "counts": {**selection.get("counts", {}), "sft": len(sft), "pairs": len(pairs)},
            "ids_sha256": _ids_hash(ids),
            "logged": {
                "ratio": ratio,
                "synthetic_sft": len(synthetic_sft),
                "real_sft": len(real_sft),
                "real_pairs": len(real_pairs),
                "turn_ids": [r.id for r in chosen],
            },
        }
    )
    tmp = run_dir / "selection.json.tmp"
    tmp.write_text(json.dumps(selection, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, run_dir / "selection.json")
    chosen_ids = [r.id for r in chosen]
    with db.session() as s:
        s.execute(
            update(LoggedTurnRow)
            .where(
                LoggedTurnRow.exported_iteration == iteration, LoggedTurnRow.id.not_in(chosen_ids)
            )
            .values(exported_iteration=None)
        )
        if chosen_ids:
            s.execute(
                update(LoggedTurnRow)
                .where(LoggedTurnRow.id.in_(chosen_ids))
                .values(exported_iteration=iteration)
            )
    return MixResult(iteration, len(synthetic_sft), len(real_sft), len(real_pairs), chosen_ids)


def mix_into_training_set(
    db: Database, run_dir: Path, iteration: int, *, ratio: float, system_prompt: str
) -> MixResult:
    """Add pending logged examples to a curriculum iteration's selected files (idempotent)."""
    sft = [r for r in _read_jsonl(run_dir / "sft.jsonl") if r.get("source") != "logged"]
    pairs = [r for r in _read_jsonl(run_dir / "pairs.jsonl") if r.get("source") != "logged"]
    with db.session() as s:
        pending = list(s.scalars(eligible_query(iteration)))
    # A selection with no synthetic dialogue leaves the real data for a logged retrain.
    _, take_real = mix_counts(len(sft), len(pending), ratio) if sft else (0, 0)
    selection_path = run_dir / "selection.json"
    selection = json.loads(selection_path.read_text("utf-8")) if selection_path.is_file() else {}
    return _finish_files(
        db, run_dir, iteration, sft, pairs, pending[:take_real], system_prompt, ratio, selection
    )


def build_logged_training_set(
    db: Database,
    runs_dir: Path,
    iteration: int,
    *,
    ratio: float,
    system_prompt: str,
    seed: int = 0,
) -> MixResult:
    """A retrain's files: pending logged examples plus a sample of earlier synthetic SFT data."""
    run_dir = Path(runs_dir) / f"iter-{iteration:03d}"
    pool: list[dict[str, Any]] = []
    for earlier in sorted(Path(runs_dir).glob("iter-*/sft.jsonl")):
        if earlier.parent == run_dir:
            continue
        pool.extend(r for r in _read_jsonl(earlier) if r.get("source") != "logged")
    with db.session() as s:
        pending = list(s.scalars(eligible_query(iteration)))
    take_syn, take_real = mix_counts(len(pool), len(pending), ratio)
    rng = random.Random(seed * 7919 + iteration)
    synthetic = rng.sample(pool, take_syn) if take_syn < len(pool) else pool
    selection = {"source": "logged-retrain", "counts": {"pool": len(pool)}}
    return _finish_files(
        db, run_dir, iteration, synthetic, [], pending[:take_real], system_prompt, ratio, selection
    )
