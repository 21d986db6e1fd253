"""How long does the chat model want its replies? The share that would hit each token cap.

Lets the model reply with a generous cap to recorded dialogue contexts (a run's pairs
file: the same contexts the bot met in training dialogues), with the serving sampling
parameters and one seed per context, and reports the share of replies that reach 96, 128,
160 and 192 tokens: the cap rate each `generation.max_new_tokens` would give.

    python bench/reply_cap.py [--pairs docs/results/isco800-2026-12-01-b/iter-001-pairs.jsonl.gz]
        [--contexts 96] [--max 192]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench._record import record
from bench.dpo_stop_probe import read_pairs, replies_to
from core.local_model import LocalModel
from core.runtime import ensure_embedded_model
from core.settings import load_settings

PAIRS = (
    Path(__file__).resolve().parents[1]
    / "docs"
    / "results"
    / "isco800-2026-12-01-b"
    / "iter-001-pairs.jsonl.gz"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, default=PAIRS)
    ap.add_argument("--model", default=None, help="model dir (default: the embedded one)")
    ap.add_argument("--contexts", type=int, default=96)
    ap.add_argument("--skip", type=int, default=160, help="contexts skipped after shuffling")
    ap.add_argument("--max", type=int, default=192, help="the generous cap")
    args = ap.parse_args()

    settings = load_settings()
    rows = read_pairs(args.pairs)
    random.Random(0).shuffle(rows)
    contexts = [r["prompt"] for r in rows[args.skip : args.skip + args.contexts]]
    params = settings.generation.params(max_new_tokens=args.max)
    model_dir = args.model or str(ensure_embedded_model(settings.models_dir))
    model = LocalModel(model_dir, device="cpu", dtype="float32", load_in_4bit=False,
                       max_batch_size=24)  # fmt: skip
    try:
        tokens = [c.completion_tokens for c in replies_to(model, contexts, None, params)]
    finally:
        model.close()
    caps = sorted({96, 128, 160, args.max, settings.generation.max_new_tokens})
    report = {
        "pairs": str(args.pairs),
        "contexts": len(tokens),
        "generous_cap": args.max,
        "serving_cap": settings.generation.max_new_tokens,
        "mean_tokens": round(statistics.fmean(tokens), 1),
        "median_tokens": statistics.median(tokens),
        "share_reaching": {
            str(c): round(sum(t >= c for t in tokens) / len(tokens), 4)
            for c in caps
            if c <= args.max
        },
    }
    record("reply_cap", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
