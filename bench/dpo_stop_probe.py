"""Does a DPO recipe teach the chat model to run on to the token cap? A CPU-sized probe.

Trains DPO alone from the base on a sample of a run's recorded preference pairs, once per
recipe, then lets base and every adapter reply to the held-out pairs' contexts with the
serving sampling parameters (the same seed per context for every system) and reports how
often each hits the cap, its mean reply tokens, and the paired change against base.

    python bench/dpo_stop_probe.py --pairs runs/iter-001/pairs.jsonl [--train 240]
        [--contexts 120] [--recipes label-end,default,balanced] [--lr 5e-5] [--batch 2]

Recipes: ``label-end`` labels every stopped rejected reply's end-of-turn (plain DPO);
``default`` never labels a rejected end-of-turn; ``balanced`` adds length balancing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from bench._record import record
from core.local_model import LocalModel
from core.runtime import ensure_embedded_model
from core.settings import load_settings
from core.types import ChatMessage
from learner.stats import paired_bootstrap
from learner.train import TrainConfig, train_adapter

RECIPES = {
    "label-end": {"dpo_rejected_turn_end": True},
    "default": {},
    "balanced": {"dpo_balance_length": True},
}


def read_pairs(path: Path) -> list[dict]:
    """A pairs file's rows (.jsonl or .jsonl.gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def replies_to(model: LocalModel, contexts: list[list[dict]], adapter: str | None, params) -> list:
    """One reply per context, in batches of 24, the seed of context k being k."""
    out = []
    for start in tqdm(range(0, len(contexts), 24), desc=adapter or "base", leave=False):
        part = contexts[start : start + 24]
        convs = [[ChatMessage(m["role"], m["content"]) for m in c] for c in part]
        seeds = list(range(start, start + len(part)))
        out += model.generate_batch(convs, params, adapter=adapter, seeds=seeds)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--model", default=None, help="base model dir (default: the embedded one)")
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--contexts", type=int, default=120)
    ap.add_argument("--recipes", default="label-end,default,balanced")
    ap.add_argument("--lr", type=float, default=5e-5)
    # Pairs per step: 8 (16 sequences of up to ~600 tokens) ran out of 24 GiB on CPU.
    ap.add_argument("--batch", type=int, default=2, help="pairs per optimizer step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    settings = load_settings()
    model_dir = args.model or str(ensure_embedded_model(settings.models_dir))
    rows = read_pairs(args.pairs)
    random.Random(args.seed).shuffle(rows)
    train, held = rows[: args.train], rows[args.train : args.train + args.contexts]
    if len(held) < args.contexts:
        ap.error(f"{args.pairs} has {len(rows)} pairs: too few for --train and --contexts")
    params = settings.generation.params()
    base = TrainConfig.from_settings(
        settings.learner.train, device="cpu", load_in_4bit=False, epochs=0, max_steps=-1,
        dpo=True, dpo_learning_rate=args.lr, batch_size=args.batch * 2,
    )  # fmt: skip
    model = LocalModel(model_dir, device="cpu", dtype="float32", load_in_4bit=False,
                       max_batch_size=24)  # fmt: skip
    contexts = [r["prompt"] for r in held]
    systems: dict[str, dict] = {}
    results = {"base": replies_to(model, contexts, None, params)}
    with tempfile.TemporaryDirectory() as tmp:
        pairs_path = _write(train, Path(tmp) / "pairs.jsonl")
        sft = [{"dialogue_id": f"p{k}", "messages": [*r["prompt"], {"role": "assistant",
                "content": r["chosen"]}]} for k, r in enumerate(train)]  # fmt: skip
        sft_path = _write(sft, Path(tmp) / "sft.jsonl")
        for name in args.recipes.split(","):
            config = dataclasses.replace(base, **RECIPES[name])
            started = time.perf_counter()
            trained = train_adapter(model_dir, sft_path, Path(tmp) / name, config,
                                    pairs_path=pairs_path)  # fmt: skip
            model.load_adapter(name, Path(tmp) / name)
            results[name] = replies_to(model, contexts, name, params)
            systems[name] = {"train_seconds": round(time.perf_counter() - started, 1),
                             "dpo": trained.dpo}  # fmt: skip
    model.close()
    capped = {k: [float(c.finish_reason == "length") for c in v] for k, v in results.items()}
    tokens = {k: [float(c.completion_tokens) for c in v] for k, v in results.items()}
    report = {"pairs": str(args.pairs), "train_pairs": len(train), "contexts": len(held),
              "lr": args.lr, "max_new_tokens": params.max_new_tokens, "systems": {}}  # fmt: skip
    for name in results:
        entry = {"cap_rate": round(statistics.fmean(capped[name]), 4),
                 "mean_tokens": round(statistics.fmean(tokens[name]), 2), **systems.get(name, {})}  # fmt: skip
        if name != "base":
            users = [str(k) for k in range(len(held))]
            for key, values in (("cap_rate", capped), ("mean_tokens", tokens)):
                ci = paired_bootstrap(dict(zip(users, values[name], strict=True)),
                                      dict(zip(users, values["base"], strict=True)))  # fmt: skip
                entry[f"{key}_delta"] = [round(x, 4) for x in (ci.mean_diff, ci.lo, ci.hi)]  # type: ignore[arg-type]
        report["systems"][name] = entry
    record("dpo_stop_probe", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
