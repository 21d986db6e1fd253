"""`upc learn ...`: corpus generation (Algorithm 1) and curriculum selection.

Add a subcommand by writing ``_add_<name>(sub)`` and listing it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any

from core.types import BASE_ADAPTER

__all__ = ["SUBCOMMANDS", "generation_config", "learn_subparsers", "register"]

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


SUBCOMMANDS: list[Callable[[Any], None]] = [_add_generate, _add_select, _add_sanity]


def register(subparsers: Any) -> Any:
    sub = learn_subparsers(subparsers)
    for add in SUBCOMMANDS:
        add(sub)
    return sub


def generation_config(settings: Any, **overrides: Any):  # type: ignore[no-untyped-def]
    from core.types import GenerationParams
    from learner.generate import GenerationConfig

    gen = settings.generation
    learner = settings.learner.generate
    values: dict[str, Any] = {
        "turns": learner.turns,
        "max_regenerations": learner.max_regenerations,
        "accept_threshold": learner.accept_threshold,
        "best_of_n": learner.best_of_n,
        "batch_size": learner.batch_size,
        "chatbot_params": GenerationParams(
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            repetition_penalty=gen.repetition_penalty,
            timeout_s=gen.timeout_s,
        ),
        "user_params": GenerationParams(
            max_new_tokens=64,
            temperature=0.8,
            top_p=gen.top_p,
            repetition_penalty=gen.repetition_penalty,
            timeout_s=gen.timeout_s,
        ),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationConfig(**values)


def _pick_iteration(store: Any, requested: int | None) -> int:
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


def format_stats(stats: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    fm, lm, tok = stats["first_means"], stats["final_means"], stats["tokens"]
    lines = [
        f"iteration {stats['iteration']}: {stats['done']} done, {stats['failed']} failed "
        f"of {stats['dialogues']} dialogues; {stats['turns']} scored turns",
        f"  regeneration rate      {stats['regeneration_rate']:.1%} "
        f"(paper, iteration 1: {PAPER_ITER1['regeneration_rate']:.1%})",
        f"  regenerations / reply  {stats['avg_regenerations']:.3f} "
        f"(paper, iteration 1: {PAPER_ITER1['avg_regenerations']:.3f})",
        f"  easy dialogues         {stats['easy']} ({stats['easy_rate']:.1%})",
        f"  first attempt  rel {f(fm['rel'])}  int {f(fm['int'])}  val {f(fm['val'])}",
        f"  final reply    rel {f(lm['rel'])}  int {f(lm['int'])}  val {f(lm['val'])}",
        f"  unscored               {stats['unscored']}",
        f"  tokens                 chatbot {tok['chatbot']}  user {tok['user']}  "
        f"critic {tok['critic']}",
    ]
    if stats["failure_causes"]:
        lines.append(f"  failures by role       {stats['failure_causes']}")
    return "\n".join(lines)


def _generate(args: argparse.Namespace, settings: Any) -> int:
    from tqdm import tqdm

    from core.runtime import ModelPool
    from learner.critic import build_critic
    from learner.curriculum import compute_stats, personas_for_iteration
    from learner.generate import CorpusGenerator
    from learner.store import CorpusStore
    from personas.catalog import PersonaCatalog
    from storage.db import Database

    if args.users < 1:
        print("--users must be 1 or more")
        return 2
    store = CorpusStore(Database.from_settings(settings))
    iteration = _pick_iteration(store, args.iteration)
    catalog = PersonaCatalog.load(settings)
    existing = store.get_run(iteration)
    if existing is not None:
        ids = existing.config.get("persona_ids", [])
        personas = [catalog.get(pid) for pid in ids]
        print(f"resuming iteration {iteration} ({len(personas)} users)")
    else:
        pool_personas = catalog.all(split=args.split)
        if not pool_personas:
            print(f"no personas in split {args.split!r}")
            return 2
        personas = personas_for_iteration(
            pool_personas, store, iteration, args.users, seed=args.seed or 0
        )
    config = generation_config(settings, turns=args.turns, adapter=args.adapter, seed=args.seed)
    pool = ModelPool(settings)
    try:
        chatbot = pool.get(settings.chatbot)
        if args.adapter and args.adapter != BASE_ADAPTER and hasattr(chatbot, "load_adapter"):
            # Algorithm 2: the current fine-tuned chatbot generates the next corpus.
            from learner.registry import AdapterRegistry

            registry = AdapterRegistry(settings.adapters_dir, store.db)
            chatbot.load_adapter(args.adapter, registry.verified_path(args.adapter))
        user_model = pool.get(settings.user_sim)
        critic_model = (
            pool.get(settings.critic) if settings.learner.critics.critic == "llm" else None
        )
        critic = build_critic(settings, model=critic_model)
        bars: dict[str, Any] = {}
        total_turns = len(personas) * max(config.turns - 1, 0)
        if not args.no_progress:
            bars = {
                "dialogue": tqdm(total=len(personas), desc="dialogues", position=0),
                "turn": tqdm(total=len(personas) + total_turns, desc="turns", position=1),
                "regeneration": tqdm(desc="regenerations", position=2),
            }

        def progress(kind: str, n: int) -> None:
            if kind in bars:
                bars[kind].update(n)

        generator = CorpusGenerator(
            chatbot, user_model, critic, config, store=store, progress=progress
        )
        run, _resumed = store.open_run(
            iteration,
            split=args.split,
            config={**config.to_dict(), "persona_ids": [p.id for p in personas]},
            models={
                **generator.model_ids(),
                "prompt_versions": generator.prompt_versions,
            },
        )
        result = generator.run(personas, run.id)
        for bar in bars.values():
            bar.close()
        dialogues = store.dialogues(run.id)
        stats = compute_stats(
            dialogues, iteration, settings.learner.select.alpha, settings.learner.select.beta
        )
        store.finish_run(run.id, stats.to_dict(), stats.tokens)
    finally:
        pool.close()
    print(format_stats(stats.to_dict()))
    if result.skipped:
        print(f"  resumed: {result.skipped} dialogues were already finished")
    print(f"  elapsed                {result.elapsed_s:.1f}s")
    return 0


def _select(args: argparse.Namespace, settings: Any) -> int:
    from learner.curriculum import select_iteration
    from learner.store import CorpusStore
    from storage.db import Database

    store = CorpusStore(Database.from_settings(settings))
    try:
        result = select_iteration(
            store,
            settings.runs_dir,
            args.iteration,
            alpha=args.alpha if args.alpha is not None else settings.learner.select.alpha,
            beta=args.beta if args.beta is not None else settings.learner.select.beta,
            accept_threshold=settings.learner.generate.accept_threshold,
            pair_min_gap=settings.learner.select.pair_min_gap,
            holdout_ratio=settings.learner.select.holdout_ratio,
            skip_flagged=settings.learner.select.skip_flagged_targets,
        )
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print(format_stats(result.stats.to_dict()))
    print(
        json.dumps(
            {
                "output_dir": str(result.output_dir),
                "sft": result.sft_count,
                "pairs": result.pair_count,
                "pending_users": len(result.pending_persona_ids),
                "ids_sha256": result.ids_hash,
            },
            indent=2,
        )
    )
    return 0


def _sanity(args: argparse.Namespace, settings: Any) -> int:
    import dataclasses

    from core.runtime import ModelPool
    from learner.critic import build_critic
    from learner.sanity import (
        evaluate_adversarial,
        evaluate_critic,
        load_adversarial_cases,
        load_sanity_cases,
    )

    if args.every < 1:
        print("--every must be 1 or more")
        return 2
    kind = args.critic or settings.learner.critics.critic
    settings = dataclasses.replace(
        settings,
        learner=dataclasses.replace(
            settings.learner, critics=dataclasses.replace(settings.learner.critics, critic=kind)
        ),
    )
    pool = ModelPool(settings)
    try:
        model = pool.get(settings.critic) if kind == "llm" else None
        critic = build_critic(settings, model=model)
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


def _print_adversarial(reports: dict[str, Any]) -> None:
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
