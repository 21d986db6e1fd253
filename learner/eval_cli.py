"""`upc eval`: compare systems (base, adapters, OpenAI-compatible models) on test users."""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["register", "select_personas"]

_CRITICS = ("llm", "embedding", "both")


def register(subparsers: Any) -> Any:
    p = subparsers.add_parser(
        "eval",
        help="evaluate systems on test users (critic scores, ALOE, independent metrics)",
        description=(
            "Each user has a T-turn dialogue with each system; the critic scores every reply "
            "but the greeting. Writes report.json, report.md, report.png and dialogues.jsonl."
        ),
    )
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--set", dest="set_name", help="persona set (default: every set)")
    p.add_argument("--personas", help="evaluate the users of this persona file instead")
    p.add_argument("--users", type=int, default=50, help="number of users (default 50)")
    p.add_argument("--turns", type=int, default=5, help="dialogue turns, 2 to 10 (default 5)")
    p.add_argument(
        "--systems",
        default="base",
        help="comma-separated: base, adapter ids, openai:MODEL@URL (default: base)",
    )
    p.add_argument(
        "--critic",
        choices=_CRITICS,
        default=None,
        help="llm, embedding, or both (both reports their Spearman agreement); "
        "default: settings.learner.critic",
    )
    p.add_argument("--out", help="output dir (default: <data>/runs/eval-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval)
    return p


def select_personas(personas: list[Any], users: int, seed: int) -> list[Any]:
    """A seeded sample of ``users`` personas, kept in catalog order (all when fewer)."""
    if users >= len(personas):
        return list(personas)
    chosen = set(random.Random(seed).sample(range(len(personas)), users))
    return [p for i, p in enumerate(personas) if i in chosen]


def _load_personas(args: argparse.Namespace, settings: Any) -> tuple[list[Any], str]:
    if args.personas:
        from personas.importer import parse_file

        pool = parse_file(args.personas, "eval", default_split=args.split)
        pool = [p for p in pool if p.split == args.split]
        source = f"{args.personas}, split {args.split}"
    else:
        from personas.catalog import PersonaCatalog

        catalog = PersonaCatalog.load(settings)
        pool = catalog.all(split=args.split, set_name=args.set_name)
        source = f"{args.set_name or 'all sets'}, split {args.split}"
    if not pool:
        raise ValueError(f"no users in split {args.split!r} ({source})")
    return select_personas(pool, args.users, args.seed), source


def _critic(settings: Any, kind: str, pool: Any) -> Any:
    from learner.critic import build_critic

    learner = dataclasses.replace(settings.learner, critic=kind)
    chosen = dataclasses.replace(settings, learner=learner)
    model = pool.get(settings.critic) if kind == "llm" else None
    return build_critic(chosen, model=model)


def _eval(args: argparse.Namespace, settings: Any) -> int:
    from tqdm import tqdm

    from chatbot.embeddings import Embedder
    from chatbot.openai_model import OpenAIModel
    from chatbot.runtime import ModelPool
    from learner.cli import generation_config
    from learner.evaluate import EvalConfig, evaluate, parse_systems, write_outputs
    from learner.registry import AdapterError, AdapterRegistry
    from personas.importer import PersonaImportError
    from storage.db import Database

    try:
        if args.users < 1:
            raise ValueError("--users must be 1 or more")
        specs = parse_systems(args.systems)
        personas, source = _load_personas(args, settings)
        gen = generation_config(settings)
        config = EvalConfig(
            turns=args.turns,
            seed=args.seed,
            batch_size=args.batch_size or settings.learner.batch_size,
            use_memory=not args.no_memory,
            chatbot_params=gen.chatbot_params,
            user_params=(
                dataclasses.replace(gen.user_params, max_new_tokens=args.user_max_new_tokens)
                if args.user_max_new_tokens
                else gen.user_params
            ),
        )
    except (ValueError, PersonaImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    critic_kind = args.critic or settings.learner.critic
    out_dir = (
        Path(args.out)
        if args.out
        else settings.runs_dir / ("eval-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    )
    pool = ModelPool(settings)
    openai_models: list[Any] = []
    bar = None
    try:
        local = None
        systems = []
        needs_local = any(s.kind != "openai" for s in specs)
        if needs_local or not args.no_perplexity:
            local = pool.get(settings.chatbot)
        registry = None
        for spec in specs:
            if spec.kind == "openai":
                model = OpenAIModel(
                    spec.base_url,  # type: ignore[arg-type]
                    spec.model,  # type: ignore[arg-type]
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
                    registry = AdapterRegistry(
                        settings.adapters_dir, Database.from_settings(settings)
                    )
                if spec.adapter not in local.adapters:  # type: ignore[union-attr]
                    local.load_adapter(spec.adapter, registry.verified_path(spec.adapter))  # type: ignore[union-attr,arg-type]
            systems.append((spec, local))
        user_model = pool.get(settings.user_sim)
        embedder = Embedder()
        primary = "embedding" if critic_kind == "embedding" else "llm"
        critic = _critic(settings, primary, pool)
        second = _critic(settings, "embedding", pool) if critic_kind == "both" else None
        runner = None
        if not args.no_perplexity and hasattr(local, "run_exclusive"):
            runner = local.run_exclusive  # type: ignore[union-attr]
        if not args.no_progress:
            total = len(systems) * len(personas) * config.turns
            bar = tqdm(total=total, desc="eval turns", unit="turn")

        finished = {"systems": 0}

        def progress(kind: str, n: int) -> None:
            if bar is None:
                return
            if kind == "turn":
                bar.update(n)
            elif kind == "system":
                # Failed dialogues skip turns: jump to the end of this system's share.
                finished["systems"] += 1
                bar.n = finished["systems"] * len(personas) * config.turns
                bar.set_postfix_str(f"{finished['systems']}/{len(systems)} systems")
                bar.refresh()

        report = evaluate(
            systems,
            personas,
            user_model=user_model,
            critic=critic,
            second_critic=second,
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
    print(report.to_markdown())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
