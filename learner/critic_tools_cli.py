"""Thin CLI for the critics' offline fits.

python -m learner.critic_tools_cli calibrate-rubric [--replies F] [--target-pass 0.25] [--version calN]
python -m learner.critic_tools_cli fit-eval-critic --out learner/data/eval_critic.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from core.embeddings import Embedder
from learner.fit_eval_critic import DEFAULT_CACHE, DEFAULT_DATA, fit_eval_critic
from learner.rubric_critic import calibrate_from_replies

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m learner.critic_tools_cli")
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate-rubric", help="refreeze the rubric critic's calibration")
    cal.add_argument("--replies", type=Path, default=None, help="default: shipped replies")
    cal.add_argument("--version", default="cal1")
    cal.add_argument("--target-pass", type=float, default=0.25)
    cal.add_argument("--out", type=Path, default=None, help="default: learner/data/...")
    cal.add_argument("--device", default="cpu")
    fit = sub.add_parser("fit-eval-critic", help="fit the spc evaluation critic")
    fit.add_argument("--out", type=Path, required=True)
    fit.add_argument("--data", type=Path, default=DEFAULT_DATA)
    fit.add_argument("--conversations", type=int, default=600)
    fit.add_argument("--contexts-per-side", type=int, default=3)
    fit.add_argument("--seed", type=int, default=13)
    fit.add_argument("--device", default="cpu")
    fit.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "calibrate-rubric":
        cal = calibrate_from_replies(
            args.replies,
            version=args.version,
            target_pass=args.target_pass,
            out=args.out,
            device=args.device,
        )
        print(json.dumps({k: v for k, v in cal.to_dict().items() if k != "anchors"}, indent=2))
        return 0
    result = fit_eval_critic(
        out_path=args.out,
        embedder=Embedder(device=args.device),
        data_path=args.data,
        conversations=args.conversations,
        contexts_per_side=args.contexts_per_side,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    summary = asdict(result)
    summary["out_path"] = str(result.out_path)
    print(json.dumps(summary, indent=1, default=str))
    return 0 if all(math.isfinite(r.heldout_accuracy) for r in result.heads.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
