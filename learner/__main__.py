"""`python -m learner`: the learning commands (`learn`, `eval`, `adapters`, `export`, `jobs`)
without the web app, for machines that train and evaluate but never serve (a GPU box
without gradio). The same subcommands as `upc`."""

from __future__ import annotations

import argparse
import sys

from learner.commands import register_learning, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m learner", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (default: $UPC_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true")
    register_learning(parser.add_subparsers(dest="command", required=True))
    return parser


if __name__ == "__main__":
    sys.exit(run(build_parser()))
