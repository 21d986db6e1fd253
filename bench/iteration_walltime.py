"""Wall time of one whole curriculum iteration on this machine, stage by stage.

    python bench/iteration_walltime.py                       # 50 train users, settings' defaults
    python bench/iteration_walltime.py --users 50 --alpha 1 --beta 0

Runs what `upc learn iterate --iterations 1` runs (generate with Algorithm 1, select, train,
gate on the validation users, promote, hot-load signal) in a fresh data dir, with the embedded
model, and times each stage through the driver's stage hook. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._record import record


def _stored_generation_s(settings) -> float | None:
    from storage.corpus_models import RunRow
    from storage.db import Database

    db = Database.from_settings(settings)
    try:
        with db.session() as session:
            run = session.query(RunRow).filter(RunRow.iteration == 1).one_or_none()
            if run is None or run.finished_at is None:
                return None
            return round((run.finished_at - run.created_at).total_seconds(), 1)
    finally:
        db.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--model-dir", default=None, help="a materialized model dir to link")
    parser.add_argument("--alpha", type=int, default=None, help="difficulty alpha override")
    parser.add_argument("--beta", type=int, default=None, help="difficulty beta override")
    parser.add_argument("--workdir", default=None, help="default: a fresh temporary dir")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="UPC_KEY=VALUE",
        help="extra settings, e.g. UPC_LEARNER__GATE_USERS=10",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from core.settings import load_settings
    from learner.cli import CorpusBars
    from learner.iterate import build_driver
    from learner.stages import LoopParts

    data_dir = Path(args.workdir or tempfile.mkdtemp(prefix="upc-iter-bench-")) / "upc-data"
    env = {k: v for k, v in os.environ.items() if k.startswith("UPC_")}
    env["UPC_DATA_DIR"] = str(data_dir)
    if args.alpha is not None:
        env["UPC_LEARNER__ALPHA"] = str(args.alpha)
    if args.beta is not None:
        env["UPC_LEARNER__BETA"] = str(args.beta)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    if args.model_dir:
        link = data_dir / "models" / "smollm2-135m-instruct"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(Path(args.model_dir).resolve(), link)
    settings = load_settings(env=env)

    stage_start: dict[str, float] = {}
    order: list[str] = []

    def on_stage(stage: str, _k: int) -> None:
        stage_start[stage] = time.perf_counter()
        order.append(stage)

    parts = LoopParts.from_settings(settings)
    driver = build_driver(settings, parts, gate=True, progress=CorpusBars(), progress_bar=True)
    driver.on_stage = on_stage
    state = driver.run_iteration(1, users=args.users)
    ended = time.perf_counter()
    marks = [stage_start[s] for s in order] + [ended]
    stages = {s: round(marks[i + 1] - marks[i], 1) for i, s in enumerate(order)}
    resumed = "generate" not in order
    if resumed:
        # An earlier invocation generated the corpus; its time is in the corpus store.
        stages = {"generate": _stored_generation_s(settings), **stages}
    learner = settings.learner
    out = {
        "benchmark": "iteration_walltime",
        "users": args.users,
        "turns": learner.generate.turns,
        "max_regenerations": learner.generate.max_regenerations,
        "critic": learner.critics.critic,
        "alpha": learner.select.alpha,
        "beta": learner.select.beta,
        "gate_users": learner.gate.gate_users,
        "lora_rank": learner.train.lora_rank,
        "max_new_tokens": settings.generation.max_new_tokens,
        "wall_s": round(sum(v for v in stages.values() if v is not None), 1),
        "wall_min": round(sum(v for v in stages.values() if v is not None) / 60, 2),
        "resumed_after_generate": resumed,
        "stages_s": stages,
        **{k: state.row()[k] for k in ("easy_rate", "regeneration_rate")},
        "trained_examples": state.training.metrics.get("examples") if state.training else None,
        "train_tokens_per_s": (
            state.training.metrics.get("tokens_per_s") if state.training else None
        ),
        "adapter": state.adapter_id,
        "promoted": state.promoted,
        "gate": {
            k: getattr(state.gate, k, None)
            for k in ("promote", "reason", "candidate_mean", "baseline_mean", "delta")
        },
        "note": state.note,
    }
    record("iteration_walltime", json.loads(json.dumps(out, default=str)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
