"""`upc eval`: compare systems (base, adapters, OpenAI-compatible models) on test users."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.embeddings import Embedder
from core.openai_model import OpenAIModel
from core.runtime import ModelPool
from core.settings import Settings
from core.types import ChatModel
from learner.critic import build_critic, critic_kind
from learner.eval_records import EvalConfig, SystemSpec, parse_systems
from learner.eval_report import to_markdown, write_outputs
from learner.evaluate import evaluate_systems
from learner.registry import AdapterError, AdapterRegistry
from learner.side_by_side import unblind, write_side_by_side
from learner.stages import generation_config
from personas.catalog import PersonaCatalog
from personas.importer import PersonaImportError, parse_personas
from storage.db import Database

__all__ = ["EVAL_CRITICS", "TRAIN_CRITICS", "register", "select_personas"]

TRAIN_CRITICS = ("rubric", "embedding", "llm")
EVAL_CRITICS = ("spc", "rubric", "embedding", "llm")


def register(subparsers: Any) -> Any:
    p = subparsers.add_parser(
        "eval",
        # No prefix matching: the sub-commands' "--n" must not look like "--no-memory".
        allow_abbrev=False,
        help="evaluate systems on test users (two critics, critic-free checks, ALOE)",
        description=(
            "Each user has --seeds T-turn dialogues with each system; the training critic "
            "scores every reply but the greeting and the evaluation critic re-scores it. "
            "Writes report.json, report.md, report.png and transcripts.jsonl. "
            "`upc eval side-by-side` builds a blind page for people to compare two systems."
        ),
    )
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--set", dest="set_name", help="persona set (default: every set)")
    p.add_argument(
        "--personas",
        help="evaluate the users of this file (e.g. the published ISCO-800 JSON) instead",
    )
    p.add_argument("--users", type=int, default=50, help="number of users (default 50)")
    p.add_argument("--seeds", type=int, default=2, help="dialogues per user (default 2)")
    p.add_argument("--turns", type=int, default=5, help="dialogue turns, 2 to 10 (default 5)")
    p.add_argument(
        "--systems",
        default="base",
        help="comma-separated: base, adapter ids, openai:MODEL@URL (default: base)",
    )
    p.add_argument(
        "--train-critic",
        choices=TRAIN_CRITICS,
        default=None,
        help="the critic training optimises (default: settings.learner.critics.critic)",
    )
    p.add_argument(
        "--eval-critic",
        choices=EVAL_CRITICS,
        default=None,
        help="the independent critic (default: settings.learner.critics.eval_critic, spc: fitted on "
        "Synthetic-Persona-Chat)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="relative worsening of a critic-free check counted as a regression "
        "(default: settings.learner.gate.gate_tolerance)",
    )
    p.add_argument("--out", help="output dir (default: <data>/runs/eval-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="dialogues decoded together (default: all of a system's dialogues)",
    )
    p.add_argument(
        "--openai-key-env",
        default="OPENAI_API_KEY",
        help="env var holding the key for openai: systems (default OPENAI_API_KEY)",
    )
    p.add_argument(
        "--user-max-new-tokens",
        type=int,
        default=None,
        help="cap on each simulated-user turn (default 64)",
    )
    p.add_argument("--no-memory", action="store_true", help="discovery from replies only")
    p.add_argument("--no-perplexity", action="store_true")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="one system after another (default: all at once, sharing decode batches)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval)
    sub = p.add_subparsers(dest="eval_command", metavar="{side-by-side,unblind}")
    sbs = sub.add_parser(
        "side-by-side",
        help="a blind HTML page comparing two systems' dialogues with the same users",
    )
    sbs.add_argument("--a", required=True, help="report dir or transcripts.jsonl")
    sbs.add_argument("--b", help="report dir or transcripts.jsonl (default: the same as --a)")
    sbs.add_argument("--a-system", help="system of --a (needed when it holds several)")
    sbs.add_argument("--b-system", help="system of --b (needed when it holds several)")
    sbs.add_argument("--out", required=True, help="the page (FILE.html); key: FILE.key.json")
    sbs.add_argument("--n", type=int, default=50, help="items to sample (default 50, 0: all)")
    sbs.add_argument("--seed", type=int, default=0, help="sampling and side shuffling seed")
    sbs.add_argument("--hide-persona", action="store_true", help="show only the user's name")
    sbs.set_defaults(func=_side_by_side)
    unb = sub.add_parser("unblind", help="tally saved side-by-side answers with their key")
    unb.add_argument("--key", required=True, help="FILE.key.json written with the page")
    unb.add_argument("answers", nargs="+", help="answer files downloaded from the page")
    unb.set_defaults(func=_unblind)
    return p


def select_personas(personas: list[Any], users: int, seed: int) -> list[Any]:
    """A seeded sample of ``users`` personas, kept in catalog order (all when fewer)."""
    if users >= len(personas):
        return list(personas)
    chosen = set(random.Random(seed).sample(range(len(personas)), users))
    return [p for i, p in enumerate(personas) if i in chosen]


def _load_personas(args: argparse.Namespace, settings: Settings) -> tuple[list[Any], str]:
    if args.personas:
        parsed = parse_personas(args.personas, "eval", default_split=args.split)
        if parsed.merged_duplicates:
            print(
                f"{args.personas}: merged {parsed.merged_duplicates} duplicate rows "
                f"(same id, name, background and split): {len(parsed.personas)} users",
                file=sys.stderr,
            )
        pool = [p for p in parsed.personas if p.split == args.split]
        source = f"{args.personas}, split {args.split}"
    else:
        catalog = PersonaCatalog.load(settings)
        pool = catalog.all(split=args.split, set_name=args.set_name)
        source = f"{args.set_name or 'all sets'}, split {args.split}"
    if not pool:
        raise ValueError(f"no users in split {args.split!r} ({source})")
    return select_personas(pool, args.users, args.seed), source


def _config(args: argparse.Namespace, settings: Settings) -> EvalConfig:
    if args.users < 1:
        raise ValueError("--users must be 1 or more")
    gen = generation_config(settings)
    tolerance = args.tolerance
    if tolerance is None:
        tolerance = settings.learner.gate.gate_tolerance
    return EvalConfig(
        turns=args.turns,
        seed=args.seed,
        seeds=args.seeds,
        batch_size=args.batch_size,
        regression_tolerance=tolerance,
        use_memory=not args.no_memory,
        parallel_systems=not args.sequential,
        chatbot_params=gen.chatbot_params,
        user_params=(
            dataclasses.replace(gen.user_params, max_new_tokens=args.user_max_new_tokens)
            if args.user_max_new_tokens
            else gen.user_params
        ),
    )


def _systems(
    specs: list[SystemSpec], pool: ModelPool, settings: Settings, args: argparse.Namespace
) -> tuple[list[tuple[SystemSpec, ChatModel]], ChatModel | None, list[OpenAIModel]]:
    """(spec, model) pairs, the local model (or None) and the OpenAI clients to close."""
    local = None
    if any(s.kind != "openai" for s in specs) or not args.no_perplexity:
        local = pool.get(settings.chatbot)
    systems: list[tuple[SystemSpec, ChatModel]] = []
    openai_models: list[OpenAIModel] = []
    registry = None
    for spec in specs:
        if spec.kind == "openai":
            model = OpenAIModel(
                spec.base_url,
                spec.model,
                api_key=os.environ.get(args.openai_key_env) or None,
                model_id=spec.name,
            )
            openai_models.append(model)
            systems.append((spec, model))
            continue
        if spec.kind == "adapter":
            if not hasattr(local, "load_adapter"):
                raise ValueError(
                    f"adapter {spec.adapter} needs a local chatbot model "
                    "(settings.chatbot.backend = local)"
                )
            if registry is None:
                registry = AdapterRegistry(settings.adapters_dir, Database.from_settings(settings))
            if spec.adapter not in local.adapters:
                local.load_adapter(spec.adapter, registry.verified_path(spec.adapter))
        systems.append((spec, local))
    return systems, local, openai_models


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    try:
        specs = parse_systems(args.systems)
        personas, source = _load_personas(args, settings)
        config = _config(args, settings)
    except (ValueError, PersonaImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = (
        Path(args.out)
        if args.out
        else settings.runs_dir / ("eval-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    )
    pool = ModelPool(settings, batched=True)
    openai_models: list[Any] = []
    bar = None
    try:
        systems, local, openai_models = _systems(specs, pool, settings, args)
        user_model = pool.get(settings.user_sim)
        embedder = Embedder()
        train_critic = build_critic(
            settings, kind=args.train_critic or critic_kind(settings), pool=pool, embedder=embedder
        )
        eval_critic = build_critic(
            settings,
            kind=args.eval_critic or critic_kind(settings, "eval"),
            pool=pool,
            embedder=embedder,
        )
        runner = None
        if not args.no_perplexity and hasattr(local, "run_exclusive"):
            runner = local.run_exclusive
        per_system = len(personas) * config.seeds * config.turns
        if not args.no_progress:
            bar = tqdm(total=len(systems) * per_system, desc="eval turns", unit="turn")
        finished = {"systems": 0}

        def progress(kind: str, n: int) -> None:
            if bar is None:
                return
            if kind == "turn":
                bar.update(n)
            elif kind == "system":
                # Failed dialogues skip turns: jump to the end of this system's share.
                finished["systems"] += 1
                bar.n = finished["systems"] * per_system
                bar.set_postfix_str(f"{finished['systems']}/{len(systems)} systems")
                bar.refresh()

        report = evaluate_systems(
            systems,
            personas,
            user_model=user_model,
            train_critic=train_critic,
            eval_critic=eval_critic,
            embedder=embedder,
            base_runner=runner,
            base_model_id=getattr(local, "model_id", None),
            config=config,
            progress=progress,
            source=source,
        )
    except (ValueError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
        for model in openai_models:
            model.close()
        pool.close()
    paths = write_outputs(report, out_dir)
    print(to_markdown(report))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _side_by_side(args: argparse.Namespace, _settings: Settings) -> int:
    try:
        page, key, count = write_side_by_side(
            args.a,
            args.b or args.a,
            args.out,
            system_a=args.a_system,
            system_b=args.b_system,
            n=args.n or None,
            seed=args.seed,
            show_persona=not args.hide_persona,
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{count} items -> {page}")
    print(f"key (keep it from the judges): {key}")
    return 0


def _unblind(args: argparse.Namespace, _settings: Settings) -> int:
    try:
        key = json.loads(Path(args.key).read_text(encoding="utf-8"))
        for path in args.answers:
            tally = unblind(key, json.loads(Path(path).read_text(encoding="utf-8")))
            wins = ", ".join(f"{name} {n}" for name, n in tally.wins.items())
            print(f"{path}: answered {tally.answered} of {tally.items}: {wins}, tie {tally.ties}")
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
