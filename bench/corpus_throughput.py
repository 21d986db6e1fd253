"""Dialogues per minute of Algorithm 1 with the embedded model in all three roles.

Compares lockstep batching (all users advance together: one batched generation per step)
with one dialogue at a time, as the reference implementation works. Prints JSON.

    python bench/corpus_throughput.py                 # 16 users, T=5
    python bench/corpus_throughput.py --users 4 --turns 3 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._record import record


def _personas(n: int) -> list:
    from personas.catalog import PersonaCatalog

    train = PersonaCatalog.load().all(split="train")
    if len(train) < n:
        raise SystemExit(f"only {len(train)} train personas available")
    return train[:n]


def _run(model, personas, *, batch_size: int, turns: int, max_new: int, seed: int) -> dict:
    from core.types import GenerationParams
    from learner.critic import LogitCritic
    from learner.curriculum import compute_stats
    from learner.generate import CorpusGenerator, GenerationConfig

    config = GenerationConfig(
        turns=turns,
        batch_size=batch_size,
        chatbot_params=GenerationParams(max_new_tokens=max_new, temperature=0.7),
        user_params=GenerationParams(max_new_tokens=max(16, max_new * 2 // 3), temperature=0.8),
        seed=seed,
    )
    critic = LogitCritic.from_local_model(model, batch_size=max(8, batch_size))
    started = time.perf_counter()
    result = CorpusGenerator(model, model, critic, config).run(personas)
    elapsed = time.perf_counter() - started
    stats = compute_stats(result.dialogues, 1)
    generated = stats.tokens.chatbot + stats.tokens.user
    return {
        "batch_size": batch_size,
        "dialogues": stats.done,
        "failed": stats.failed,
        "elapsed_s": round(elapsed, 2),
        "dialogues_per_min": round(60.0 * stats.done / elapsed, 3),
        "turns": stats.turns,
        "regenerations": stats.regenerations,
        "regeneration_rate": stats.regeneration_rate,
        "tokens": stats.tokens.to_dict(),
        "chatbot_user_tokens_per_s": round(generated / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--model-dir", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--mode", choices=("both", "batched", "sequential"), default="both")
    parser.add_argument(
        "--sequential-users",
        type=int,
        default=None,
        help="run the one-at-a-time baseline on the first N users only (its rate per "
        "dialogue does not depend on how many run; default: all)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-4bit", action="store_true", help="CUDA: load bf16, not 4-bit NF4")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="same architecture as --model-dir but random weights (where the weights can't "
        "travel); replies always run to --max-new-tokens",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from core.devices import pick_device_and_dtype
    from core.local_model import LocalModel

    if args.model_dir:
        model_dir = args.model_dir
    else:
        from core.runtime import ensure_embedded_model
        from core.settings import load_settings

        model_dir = str(ensure_embedded_model(load_settings().models_dir))
    prebuilt: dict = {}
    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        device, dtype = pick_device_and_dtype(args.device, args.dtype)
        torch.manual_seed(args.seed)
        net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        prebuilt = {
            "model": net.to(device=device, dtype=dtype),
            "tokenizer": AutoTokenizer.from_pretrained(model_dir),
        }
    model = LocalModel(
        model_dir,
        model_id="embedded:SmolLM2-135M-Instruct" if not args.model_dir else None,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=max(8, args.users),
        queue_size=64,
        batch_window_ms=0,
        load_in_4bit=not args.no_4bit,
        **prebuilt,
    )
    personas = _personas(args.users)
    out: dict = {
        "benchmark": "corpus_throughput",
        "users": args.users,
        "turns": args.turns,
        "max_new_tokens": args.max_new_tokens,
        "device": model.device,
        "random_init": args.random_init,
        "dtype": str(model.dtype),
        "torch_threads": torch.get_num_threads(),
        "quantized_4bit": model.quantized,
    }
    try:
        common = {"turns": args.turns, "max_new": args.max_new_tokens, "seed": args.seed}
        if args.mode in ("both", "batched"):
            out["batched"] = _run(model, personas, batch_size=args.users, **common)
        if args.mode in ("both", "sequential"):
            seq_users = personas[: args.sequential_users or len(personas)]
            out["sequential"] = _run(model, seq_users, batch_size=1, **common)
    finally:
        model.close()
    if "batched" in out and "sequential" in out:
        b, s = out["batched"], out["sequential"]
        out["ratio_dialogues_per_min"] = round(b["dialogues_per_min"] / s["dialogues_per_min"], 2)
        out["ratio_tokens_per_s"] = round(
            b["chatbot_user_tokens_per_s"] / s["chatbot_user_tokens_per_s"], 2
        )
        out["target_ratio"] = 5.0
    record("corpus_throughput", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
