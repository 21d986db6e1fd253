"""The learning commands' registration and the shared `main` body, for `upc` (the whole
product) and `python -m learner` (the learning commands alone)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core.settings import SettingsError, load_settings
from learner import adapters_cli, eval_cli, export_cli, jobs_cli
from learner import cli as learner_cli
from learner.iterate_cli import register_iterate
from storage.db import DataDirError

__all__ = ["register_learning", "run"]

log = logging.getLogger(__name__)


def register_learning(sub: Any) -> None:
    """`learn` (with `iterate`), `adapters`, `jobs`, `export` and `eval`."""
    register_iterate(learner_cli.register(sub))
    for module in (adapters_cli, jobs_cli, export_cli, eval_cli):
        module.register(sub)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, set up logging and settings, run the chosen command; exit codes 2 (settings)
    and 3 (data dir)."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        log.error("settings error: %s", exc)
        return 2
    logging.getLogger().setLevel(getattr(logging, settings.log_level.upper(), logging.INFO))
    # httpx logs every request at INFO, and the llama.cpp backend makes several per reply.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args, settings) or 0)
    except DataDirError as exc:
        log.error("data dir error: %s", exc)
        return 3
