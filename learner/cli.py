"""`upc learn ...`: corpus generation (Algorithm 1), curriculum selection, critic sanity.

Thin: each command parses its arguments, calls the stage of `learner.stages` (or the
sanity checks), shows progress and prints. Add a subcommand by writing ``_add_<name>(sub)``
and listing it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.prompting import load_prompt
from core.runtime import ModelPool
from core.settings import Settings
from core.types import BASE_ADAPTER
from learner import stages
from learner.critic import build_critic, critic_kind
from learner.distributed import current_rank, setup, teardown
from learner.records import IterationStats
from learner.registry import AdapterRegistry
from learner.sanity import (
    AdversarialReport,
    evaluate_adversarial,
    evaluate_critic,
    load_adversarial_cases,
    load_sanity_cases,
)
from learner.stages import LoopParts
from learner.store import CorpusStore
from learner.train import TrainConfig
from learner.train_status import TrainingStatusStore
from storage.db import Database

__all__ = ["SUBCOMMANDS", "CorpusBars", "format_stats", "learn_subparsers", "register"]

log = logging.getLogger(__name__)

PAPER_ITER1 = {"regeneration_rate": 0.377, "avg_regenerations": 0.785}


def learn_subparsers(subparsers: Any) -> Any:
    """Create the ``learn`` group and return its sub-command action."""
    parser = subparsers.add_parser("learn", help="generate training dialogues and curricula")
    parser.set_defaults(func=lambda args, settings: (parser.print_help(), 2)[1])
    return parser.add_subparsers(dest="learn_command", metavar="COMMAND")


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="run critic-guided dialogue generation (Algorithm 1)")
    p.add_argument("--split", default="train", choices=("train", "validation", "test"))
    p.add_argument("--users", type=int, default=16, help="number of simulated users")
    p.add_argument("--iteration", type=int, default=None, help="default: resume or next")
    p.add_argument("--adapter", default=None, help="chatbot adapter id (default: base model)")
    p.add_argument("--turns", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_generate)


def _add_select(sub: Any) -> None:
    p = sub.add_parser("select", help="select the curriculum training set of an iteration")
    p.add_argument("--iteration", type=int, required=True)
    p.add_argument("--alpha", type=int, default=None)
    p.add_argument("--beta", type=int, default=None)
    p.set_defaults(func=_select)


def _add_sanity(sub: Any) -> None:
    p = sub.add_parser("sanity", help="rank known-good against known-bad replies (critic check)")
    p.add_argument(
        "--critic", choices=("rubric", "llm", "embedding"), default=None, help="default: settings"
    )
    p.add_argument(
        "--every", type=int, default=1, help="use every Nth case of each set (1: all 60 and 40)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_sanity)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train an adapter on an iteration's selection (torchrun: data-parallel)",
        description="Training settings come from the settings (UPC_LEARNER__*); the adapter "
        "is published, not activated. Under torchrun every rank trains its share of each "
        "batch and the first rank publishes.",
    )
    p.add_argument("--iteration", type=int, required=True)
    p.add_argument(
        "--parent", choices=("base", "active"), default="base", help="train from (default base)"
    )
    p.add_argument(
        "--pairs",
        default=None,
        help="train on these recorded preference pairs alone (JSON lines, plain or .gz; "
        "DPO alone: learner.dpo on, learner.epochs 0) instead of the iteration's selection",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)


def _add_gate(sub: Any) -> None:
    p = sub.add_parser(
        "gate",
        help="judge a published adapter against the active one (paired, validation users)",
        description="The gate of `learn iterate` on its own: the candidate and the active "
        "adapter talk with the same validation users under the same seeds, the gate critic "
        "scores them, and the critic-free checks must not regress. The decision is recorded "
        "on the adapter; --promote activates it when it passes.",
    )
    p.add_argument("--adapter", required=True, help="the candidate adapter id")
    p.add_argument("--promote", action="store_true", help="activate the adapter if it passes")
    p.set_defaults(func=_gate)


SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_generate,
    _add_select,
    _add_train,
    _add_gate,
    _add_sanity,
]


def register(subparsers: Any) -> Any:
    sub = learn_subparsers(subparsers)
    for add in SUBCOMMANDS:
        add(sub)
    return sub


def _pick_iteration(store: CorpusStore, requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError("--iteration must be 1 or more")
        return requested
    iterations = store.iterations()
    for iteration in iterations:
        run = store.get_run(iteration)
        if run is not None and run.status != "done":
            return iteration
    return (max(iterations) + 1) if iterations else 1


def format_stats(stats: IterationStats) -> str:
    """Algorithm 1's figures of an iteration, next to the paper's iteration 1."""

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    fm, lm, tok = stats.first_means, stats.final_means, stats.tokens
    lines = [
        f"iteration {stats.iteration}: {stats.done} done, {stats.failed} failed "
        f"of {stats.dialogues} dialogues; {stats.turns} scored turns",
        f"  regeneration rate      {stats.regeneration_rate:.1%} "
        f"(paper, iteration 1: {PAPER_ITER1['regeneration_rate']:.1%})",
        f"  regenerations / reply  {stats.avg_regenerations:.3f} "
        f"(paper, iteration 1: {PAPER_ITER1['avg_regenerations']:.3f})",
        f"  easy dialogues         {stats.easy} ({stats.easy_rate:.1%})",
        f"  first attempt  rel {f(fm.rel)}  int {f(fm.int)}  val {f(fm.val)}",
        f"  final reply    rel {f(lm.rel)}  int {f(lm.int)}  val {f(lm.val)}",
        f"  unscored               {stats.unscored}",
        f"  tokens                 chatbot {tok.chatbot}  user {tok.user}  critic {tok.critic}",
    ]
    if stats.failure_causes:
        lines.append(f"  failures by role       {stats.failure_causes}")
    return "\n".join(lines)


class CorpusBars:
    """tqdm bars for the generate stage: dialogues, turns, regenerations."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}

    def start(self, dialogues: int, turns: int) -> None:
        self._bars = {
            "dialogue": tqdm(total=dialogues, desc="dialogues", position=0),
            "turn": tqdm(total=turns, desc="turns", position=1),
            "regeneration": tqdm(desc="regenerations", position=2),
        }

    def __call__(self, kind: str, n: int) -> None:
        if kind in self._bars:
            self._bars[kind].update(n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars = {}


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    # Under torchrun each process decodes its share of the users (learner/distributed.py).
    rank = current_rank()
    setup(rank)
    parts = LoopParts.from_settings(settings)
    try:
        iteration = _pick_iteration(parts.corpus, args.iteration)
        config = stages.generation_config(
            settings, turns=args.turns, adapter=args.adapter, seed=args.seed
        )
        result = stages.generate(
            parts.pool,
            parts.critic(),
            parts.corpus,
            parts.registry,
            parts.catalog,
            iteration=iteration,
            users=args.users,
            config=config,
            alpha=settings.learner.select.alpha,
            beta=settings.learner.select.beta,
            split=args.split,
            progress=None if args.no_progress or not rank.main else CorpusBars(),
        )
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    finally:
        parts.close()
        teardown()
    if not rank.main:
        return 0
    print(format_stats(result.stats))
    if result.resumed:
        print(f"  resumed: {result.resumed} dialogues were already finished")
    print(f"  elapsed                {result.elapsed_s:.1f}s")
    return 0


def _select(args: argparse.Namespace, settings: Settings) -> int:
    config = dataclasses.replace(
        settings.learner.select,
        **{k: v for k, v in (("alpha", args.alpha), ("beta", args.beta)) if v is not None},
    )
    try:
        selection = stages.select(
            CorpusStore(Database.from_settings(settings)),
            settings.runs_dir,
            iteration=args.iteration,
            config=config,
            accept_threshold=settings.learner.generate.accept_threshold,
        )
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    assert selection.stats is not None  # a curriculum selection always has them
    print(format_stats(selection.stats))
    summary = {
        "output_dir": str(selection.run_dir),
        "sft": selection.sft_count,
        "pairs": selection.pair_count,
        "pending_users": len(selection.pending_persona_ids),
        "ids_sha256": selection.ids_hash,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _train(args: argparse.Namespace, settings: Settings) -> int:
    rank = current_rank()
    setup(rank)
    db = Database.from_settings(settings)
    try:
        registry = AdapterRegistry(settings.adapters_dir, db)
        if args.iteration < 1:
            raise ValueError("--iteration must be 1 or more")
        selection = (
            stages.recorded_pairs(settings.runs_dir, args.iteration, Path(args.pairs))
            if args.pairs
            else stages.load_selection(settings.runs_dir, args.iteration)
        )
        outcome = stages.train(
            registry,
            selection,
            runs_dir=settings.runs_dir,
            base=stages.BaseModel.from_settings(settings),
            config=TrainConfig.from_settings(settings.learner.train),
            parent_id=registry.active_id() if args.parent == "active" else BASE_ADAPTER,
            cumulative=False,
            status=TrainingStatusStore(db),
            system_prompt=str(load_prompt("upc_system")),
            progress_bar=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    finally:
        db.dispose()
        teardown()
    if rank.main:
        summary = {"adapter_id": outcome.adapter_id, "reused": outcome.reused}
        print(json.dumps({**summary, "note": outcome.note, "metrics": outcome.metrics}, indent=2))
    return 0 if outcome.adapter_id else 1


def _gate(args: argparse.Namespace, settings: Settings) -> int:
    parts = LoopParts.from_settings(settings)
    try:
        decision = stages.gate(
            parts.registry,
            args.adapter,
            pool=parts.pool,
            critic=parts.critic("gate"),
            personas=stages.gate_users(parts.catalog, settings.learner.gate),
            embedder=parts.embedder,
            config=settings.learner.gate,
            generation=stages.generation_config(settings),
        )
        promoted = args.promote and stages.promote(parts.registry, decision)
    except ValueError as exc:  # AdapterError included
        print(f"error: {exc}")
        return 2
    finally:
        parts.close()
    print(json.dumps({**decision.to_dict(), "promoted": promoted}, indent=2, default=str))
    print(f"\n{'PROMOTED' if promoted else 'passed' if decision.promote else 'refused'}: "
          f"{decision.reason}")  # fmt: skip
    return 0 if decision.promote else 1


def _sanity(args: argparse.Namespace, settings: Settings) -> int:
    if args.every < 1:
        print("--every must be 1 or more")
        return 2
    pool = ModelPool(settings, batched=True)
    try:
        critic = build_critic(settings, kind=args.critic or critic_kind(settings), pool=pool)
        cases = load_sanity_cases()[:: args.every]
        report = evaluate_critic(critic, cases)
        adversarial = {
            split: evaluate_adversarial(
                critic, load_adversarial_cases(split=split)[:: args.every], split=split
            )
            for split in ("dev", "heldout")
        }
    finally:
        pool.close()
    if args.json:
        adv = {split: r.to_dict() for split, r in adversarial.items()}
        print(json.dumps({**report.to_dict(), "adversarial": adv}, indent=2))
        return 0
    acc = report.accuracy
    print(
        f"{report.critic_model_id}: {report.cases} cases, {report.pairs_per_dimension} pairs "
        f"per dimension (chance 0.5)\n"
        f"  rel {acc['rel']:.3f}  int {acc['int']:.3f}  val {acc['val']:.3f}  "
        f"mean {report.mean_accuracy:.3f}  unscored replies {report.unscored_replies}"
    )
    _print_adversarial(adversarial)
    return 0


def _print_adversarial(reports: dict[str, AdversarialReport]) -> None:
    """The adversarial table: good reply preferred over each gaming kind (mean of the three)."""
    kinds = list(next(iter(reports.values())).preference_by_kind)
    print("\nadversarial set: good reply preferred over a gaming reply (chance 0.5)")
    print(f"  {'kind':<18}" + "".join(f"{split:>10}" for split in reports))
    for kind in kinds:
        row = "".join(f"{r.preference_by_kind[kind]:>10.3f}" for r in reports.values())
        print(f"  {kind:<18}{row}")
    print(f"  {'all pairs':<18}" + "".join(f"{r.preference:>10.3f}" for r in reports.values()))
    print(f"  {'cases':<18}" + "".join(f"{r.cases:>10d}" for r in reports.values()))
    good = "".join(f"{r.good_pass_rate:>10.3f}" for r in reports.values())
    gaming = "".join(f"{r.gaming_pass_rate:>10.3f}" for r in reports.values())
    print(f"  {'good pass rate':<18}{good}\n  {'gaming pass rate':<18}{gaming}")
