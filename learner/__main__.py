"""`python -m learner`: the learning commands (`learn`, `eval`, `adapters`, `export`, `jobs`)
without the web app, for machines that train and evaluate but never serve (a GPU box
without gradio). The same subcommands as `upc`."""

from __future__ import annotations

import argparse
import logging
import sys

from core.settings import SettingsError, load_settings
from learner import adapters_cli, eval_cli, export_cli, jobs_cli
from learner import cli as learner_cli
from learner.iterate_cli import register_iterate
from storage.db import DataDirError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m learner", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (default: $UPC_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    register_iterate(learner_cli.register(sub))
    for module in (adapters_cli, jobs_cli, export_cli, eval_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"settings error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(getattr(logging, settings.log_level.upper(), logging.INFO))
    try:
        return int(args.func(args, settings) or 0)
    except DataDirError as exc:
        print(f"data dir error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
