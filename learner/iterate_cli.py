"""`upc learn iterate`: run whole curriculum iterations (the driver is learner.iterate)."""

from __future__ import annotations

import argparse
from typing import Any

from core.settings import Settings
from learner.cli import CorpusBars
from learner.iterate import STAGES, build_driver, format_stage_times, format_table
from learner.stages import LoopParts

__all__ = ["register_iterate"]


def register_iterate(learn_subparsers: Any) -> None:
    """Add `iterate` to the `learn` group: `upc learn iterate --iterations K [--users N]`."""
    parser = learn_subparsers.add_parser(
        "iterate", help="run curriculum iterations: generate, select, train, gate, promote"
    )
    parser.add_argument("--iterations", type=int, required=True, help="total iterations to reach")
    parser.add_argument("--users", type=int, default=None, help="training users per iteration")
    parser.add_argument("--no-gate", action="store_true", help="promote without evaluation")
    parser.add_argument(
        "--until",
        choices=STAGES,
        default=None,
        help="stop the next unfinished iteration after this stage (a later run resumes it)",
    )
    parser.set_defaults(func=_iterate_handler)


def _iterate_handler(args: argparse.Namespace, settings: Settings) -> int:
    parts = LoopParts.from_settings(settings)
    try:
        driver = build_driver(
            settings, parts, gate=not args.no_gate, progress=CorpusBars(), progress_bar=True
        )
        states = driver.run(
            args.iterations,
            users=args.users,
            until=args.until,
            on_iteration=lambda s: print(format_table([s]).splitlines()[-1], flush=True),
        )
    finally:
        parts.close()
    print()
    print(format_table(states))
    print()
    print("seconds per stage")
    print(format_stage_times(states))
    return 0
