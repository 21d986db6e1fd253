"""`upc export`: write the dialogues for researchers (JSONL, ShareGPT, Parquet, HF datasets)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from core.settings import Settings
from learner.export import (
    FEEDBACK_CHOICES,
    FORMATS,
    SOURCES,
    ExportError,
    ExportFilters,
    ExportOptions,
    ExportProgress,
    export,
)
from storage import Database

__all__ = ["register"]


def _date(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO date: {value!r}") from exc
    # The database stores naive UTC times.
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _formats(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in FORMATS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"formats must be among {','.join(FORMATS)}")
    return items


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export dialogues for research (PII scrubbed by default)",
        description="Writes into <data_dir>/exports/<export_id>/. Dates are UTC, ISO format.",
    )
    p.add_argument(
        "--format",
        dest="formats",
        type=_formats,
        default=FORMATS,
        help="comma list of jsonl,sharegpt,parquet,hf (default: all)",
    )
    p.add_argument("--since", type=_date, help="conversations created at/after (UTC)")
    p.add_argument("--until", type=_date, help="conversations created before (UTC)")
    p.add_argument("--user", action="append", default=[], help="username or id (repeatable)")
    p.add_argument("--adapter", action="append", default=[], help="adapter id (repeatable)")
    p.add_argument("--min-score", type=float, help="minimum mean critic score (1..5)")
    p.add_argument("--max-score", type=float, help="maximum mean critic score (1..5)")
    p.add_argument(
        "--source",
        action="append",
        choices=SOURCES,
        help="repeatable; a union (default: real and synthetic)",
    )
    p.add_argument("--feedback", choices=FEEDBACK_CHOICES, default="any")
    p.add_argument(
        "--include-opted-out", action="store_true", help="include users excluded from training"
    )
    p.add_argument("--no-scrub", action="store_true", help="keep PII (private use only)")
    p.add_argument("--id", dest="export_id", help="export id (default: timestamped)")
    p.add_argument("--no-zip", action="store_true", help="do not zip the HF dataset directory")
    p.add_argument("--chunk-size", type=int, default=500, help="conversations per DB page")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_export)
    return p


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    filters = ExportFilters(
        since=args.since,
        until=args.until,
        users=tuple(args.user),
        adapters=tuple(args.adapter),
        min_score=args.min_score,
        max_score=args.max_score,
        sources=tuple(args.source) if args.source else ("real", "synthetic"),
        feedback=args.feedback,
        include_opted_out=args.include_opted_out,
    )
    options = ExportOptions(
        formats=args.formats,
        filters=filters,
        scrub=not args.no_scrub,
        export_id=args.export_id,
        zip_hf_dataset=not args.no_zip,
        chunk_size=args.chunk_size,
    )
    if args.no_scrub:
        print("warning: PII scrubbing is OFF; do not share this export", file=sys.stderr)
    bar = tqdm(total=0, unit="msg", disable=args.no_progress, file=sys.stderr)

    def on_progress(p: ExportProgress) -> None:
        if bar.total != p.total_messages:
            bar.total = p.total_messages
        bar.set_postfix_str(f"{p.phase} conv={p.conversations}", refresh=False)
        bar.update(p.messages - bar.n)

    db = Database.from_settings(settings)
    try:
        result = export(
            db, settings.exports_dir, options, progress=on_progress, runs_dir=settings.runs_dir
        )
    except ExportError as exc:
        bar.close()
        print(f"export error: {exc}", file=sys.stderr)
        return 2
    finally:
        db.dispose()
    bar.close()
    print(json.dumps(result.summary(), indent=2))
    return 0
