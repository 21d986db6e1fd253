"""`upc personas ...`: build, import, stats, show, generate, delete."""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from core.embeddings import Embedder
from core.runtime import build_model
from core.settings import Settings
from personas.catalog import SHIPPED_FILE, CatalogError, PersonaCatalog, personas_dir, shipped_meta
from personas.composer import DEFAULT_SEED, build_isco800, dumps_jsonl, meta_json
from personas.diversity import diversity_report
from personas.generator import GeneratorConfig, PersonaGenerator
from personas.importer import (
    PersonaImportError,
    atomic_write_text,
    delete_set,
    import_file,
    save_set,
    validate_set_name,
)
from personas.stats import persona_stats

__all__ = ["register"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("personas", help="simulated users (ISCO-800 backgrounds)")
    commands = parser.add_subparsers(dest="personas_command", required=True)

    build = commands.add_parser("build", help="compose the ISCO-800 offline from a seed")
    build.add_argument("--seed", type=int, default=None, help="default: the shipped seed (800)")
    build.add_argument("--out", type=Path, default=None, help="JSONL path to write")
    build.set_defaults(func=_build)

    imp = commands.add_parser("import", help="import a background file (.json, .jsonl, .csv)")
    imp.add_argument("file", type=Path)
    imp.add_argument("--name", default=None, help="set name (default: from the file name)")
    imp.add_argument(
        "--split",
        default="train",
        choices=("train", "validation", "test"),
        help="split for JSONL/CSV rows without a split column",
    )
    imp.add_argument("--replace", action="store_true", help="overwrite a set of that name")
    imp.set_defaults(func=_import)

    stats = commands.add_parser("stats", help="counts, lengths, setbacks and diversity")
    stats.add_argument("--set", dest="set_name", default=None, help="one set (default: all)")
    stats.add_argument("--no-diversity", action="store_true", help="skip the embedding figures")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=_stats)

    show = commands.add_parser("show", help="print one user")
    show.add_argument("id", help="persona id, e.g. isco800:21-07 or 21-07")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    gen = commands.add_parser("generate", help="write new backgrounds with the configured LLM")
    gen.add_argument("--n", type=int, required=True, help="how many users to produce")
    gen.add_argument("--set", dest="set_name", default="generated", help="set to write")
    gen.add_argument("--groups", default="", help="comma-separated ISCO-08 sub-major codes")
    gen.add_argument(
        "--split",
        default="auto",
        choices=("auto", "train", "validation", "test"),
        help="auto: the split the group has in the shipped set (train if unused)",
    )
    gen.add_argument("--role", default="critic", choices=("chatbot", "critic", "user_sim"))
    gen.add_argument("--threshold", type=float, default=0.6, help="max cosine to the pool")
    gen.add_argument("--max-attempts", type=int, default=3, help="model calls per user")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--replace", action="store_true")
    gen.set_defaults(func=_generate)

    delete = commands.add_parser("delete", help="remove an imported or generated set")
    delete.add_argument("name")
    delete.set_defaults(func=_delete)
    return parser


def _build(args: argparse.Namespace, settings: Settings) -> int:
    seed = DEFAULT_SEED if args.seed is None else args.seed
    out = args.out or personas_dir(settings) / "builds" / f"isco800-seed{seed}.jsonl"
    start = time.perf_counter()
    result = build_isco800(seed)
    text = dumps_jsonl(result.personas)
    atomic_write_text(out, text)
    atomic_write_text(out.with_name(out.stem + ".meta.json"), meta_json(result, text))
    elapsed = time.perf_counter() - start
    shipped = resources.files("personas").joinpath("data", SHIPPED_FILE).read_bytes()
    print(f"wrote {len(result.personas)} users to {out} in {elapsed:.2f} s (seed {seed})")
    print(f"excluded groups: {', '.join(result.plan.excluded)}")
    for split in ("train", "validation", "test"):
        print(f"{split:>10}: groups {', '.join(result.plan.groups(split))}")
    same = shipped == text.encode("utf-8")
    print("identical to the shipped isco800.jsonl" if same else "differs from the shipped file")
    return 0


def _import(args: argparse.Namespace, settings: Settings) -> int:
    try:
        result = import_file(
            args.file, settings.data_dir, args.name, default_split=args.split, replace=args.replace
        )
    except (PersonaImportError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    splits = ", ".join(f"{k} {v}" for k, v in result.splits.items())
    print(f"imported {result.count} users as set {result.name!r} ({splits}) -> {result.path}")
    if result.merged_duplicates:
        print(f"merged {result.merged_duplicates} duplicates (rows repeating a user exactly)")
    return 0


def _load_catalog(settings: Settings, set_name: str | None = None) -> PersonaCatalog:
    return PersonaCatalog.load(settings, sets=[set_name] if set_name else None)


def _stats(args: argparse.Namespace, settings: Settings) -> int:
    try:
        catalog = _load_catalog(settings, args.set_name)
    except CatalogError as exc:
        print(f"error: {exc}")
        return 2
    personas = catalog.all()
    stats = persona_stats(personas)
    diversity = None
    if not args.no_diversity:
        diversity = diversity_report(personas, Embedder())
    if args.json:
        payload = {
            "count": stats.count,
            "per_split": stats.per_split,
            "per_set": stats.per_set,
            "per_group": {
                c: {"title": t, "split": s, "count": n} for c, (t, s, n) in stats.per_group.items()
            },
            "setback_share": stats.setback_share,
            "words": {"min": stats.words_min, "mean": stats.words_mean, "max": stats.words_max},
            "histogram": [{"low": lo, "high": hi, "count": n} for lo, hi, n in stats.histogram],
            "diversity": diversity.to_dict() if diversity else None,
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    print(
        f"{stats.count} users in sets: {', '.join(f'{k} ({v})' for k, v in stats.per_set.items())}"
    )
    print("per split: " + ", ".join(f"{k} {v}" for k, v in stats.per_split.items()))
    if stats.per_group:
        print("per group:")
        for code, (title, split, count) in stats.per_group.items():
            print(f"  {code:>3} {split:<10} {count:>4}  {title}")
    if stats.setback_share is not None:
        print(f"with a setback: {stats.setback_share:.1%}")
    print(f"words: min {stats.words_min}, mean {stats.words_mean:.1f}, max {stats.words_max}")
    top = max((n for _, _, n in stats.histogram), default=1)
    for low, high, count in stats.histogram:
        print(
            f"  {low:>4}-{high:<4} {count:>5} {'#' * max(1, round(40 * count / top)) if count else ''}"
        )
    if diversity:
        print(
            f"MiniLM cosine: mean {diversity.mean:.3f}, max {diversity.max:.3f} "
            f"({' / '.join(diversity.max_pair or ())}); pairs above {diversity.threshold}: "
            f"{diversity.pairs_above}"
        )
        if diversity.within:
            print(
                f"within groups: mean {diversity.within_mean:.3f}, max {diversity.within_max:.3f}"
            )
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    catalog = _load_catalog(settings)
    try:
        persona = catalog.get(args.id)
    except KeyError as exc:
        print(f"error: {exc.args[0]}")
        return 2
    if args.json:
        print(json.dumps(persona.to_dict(), indent=2, ensure_ascii=False))
        return 0
    t = persona.traits
    print(f"{persona.id}  {persona.name}  [{persona.split}]")
    if persona.isco_code:
        print(f"ISCO-08 {persona.isco_code}: {persona.isco_title}")
    print(f"\n{persona.background}\n({persona.word_count} words)\n")
    if not t.is_empty:
        rows = [
            ("occupation", t.occupation),
            ("education", t.education),
            ("personality", ", ".join(t.personality)),
            ("flaws", ", ".join(t.flaws)),
            ("hobbies", ", ".join(t.hobbies)),
            ("setback", t.setback or "none"),
            ("age", str(t.age or "")),
            ("location", t.location),
        ]
        for key, value in rows:
            if value:
                print(f"  {key:<12} {value}")
    return 0


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    try:
        validate_set_name(args.set_name)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    if args.n < 1:
        print("error: --n must be at least 1")
        return 2
    groups = [g.strip() for g in args.groups.split(",") if g.strip()] or None
    split_by_group = {
        code: split for split, codes in shipped_meta()["groups"].items() for code in codes
    }

    def split_of(code: str) -> str:
        return split_by_group.get(code, "train") if args.split == "auto" else args.split

    catalog = PersonaCatalog.load(settings)
    model = build_model(getattr(settings, args.role), settings)
    try:
        generator = PersonaGenerator(
            model,
            Embedder(),
            pool=[p.background for p in catalog],
            taken_names=[p.name for p in catalog],
            config=GeneratorConfig(threshold=args.threshold, max_attempts=args.max_attempts),
            seed=args.seed,
        )
        report = generator.generate(
            args.n,
            groups=groups,
            split_of=split_of,
            set_name=args.set_name,
            progress=lambda r: print(
                f"  accepted {len(r.personas)}/{r.requested} after {r.attempts} attempts"
            ),
        )
    except KeyError as exc:
        print(f"error: {exc.args[0]}")
        return 2
    finally:
        model.close()
    reasons = ", ".join(f"{k} {v}" for k, v in report.rejected.most_common()) or "none"
    print(f"accepted {len(report.personas)} of {args.n}; rejected: {reasons}")
    if not report.personas:
        print("nothing written")
        return 1
    try:
        path = save_set(
            report.personas,
            settings.data_dir,
            args.set_name,
            {"generated_by": model.model_id, "rejected": dict(report.rejected)},
            replace=args.replace,
        )
    except FileExistsError as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {path}")
    return 0 if len(report.personas) == args.n else 1


def _delete(args: argparse.Namespace, settings: Settings) -> int:
    try:
        existed = delete_set(settings.data_dir, args.name)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print(f"deleted set {args.name!r}" if existed else f"no set named {args.name!r}")
    return 0 if existed else 1
