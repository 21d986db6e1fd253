"""Training throughput of the adapter trainer (LoRA on CPU, 4-bit QLoRA on CUDA).

    python bench/train_throughput.py --model /tmp/smol --steps 6
    python bench/train_throughput.py --model /path/to/SmolLM2 --device cuda --steps 30

Prints one JSON object: device, tokens/s (all tokens the optimizer saw per second of
training), label tokens, peak memory (CUDA: max allocated; CPU: max RSS of the process).
The dialogues are synthetic but shaped like the curriculum's: system prompt, greeting,
then alternating user/assistant turns.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

_TOPICS = [
    ("I repair fishing boats in a small harbour.", "Which repairs keep you busiest in winter?"),
    ("I teach chemistry to teenagers.", "Do experiments or theory spark more questions?"),
    ("I was a bank clerk until last spring.", "What has filled your days since then?"),
    ("I grow tomatoes on my balcony.", "Have you tried a drip line for the hot weeks?"),
    ("I coach a youth football team.", "How do you keep the quieter kids involved?"),
    ("I drive night buses across the city.", "Which route shows you the city at its oddest?"),
]


def _dialogues(n: int, turns: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [
            {"role": "system", "content": "You are a warm, curious conversation partner."},
            {"role": "assistant", "content": "Hello! What has your week been like so far?"},
        ]
        for _ in range(turns):
            intro, reply = rng.choice(_TOPICS)
            messages.append({"role": "user", "content": intro + " It keeps me busy."})
            messages.append(
                {"role": "assistant", "content": "That sounds demanding and rewarding. " + reply}
            )
        out.append({"dialogue_id": f"bench-{i}", "persona_id": f"p{i}", "messages": messages})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("UPC_TEST_MODEL_DIR", "/tmp/smol"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dialogues", type=int, default=16)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--no-4bit", action="store_true", help="CUDA: train in bf16, not NF4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from learner.train import TrainConfig, train_adapter

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    config = TrainConfig(
        lora_rank=args.rank,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum,
        max_seq_len=args.max_seq_len,
        device=args.device,
        load_in_4bit=not args.no_4bit,
    )
    with tempfile.TemporaryDirectory(prefix="upc-bench-") as tmp:
        sft = Path(tmp) / "sft.jsonl"
        rows = _dialogues(args.dialogues, args.turns, seed=0)
        sft.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        result = train_adapter(args.model, sft, Path(tmp) / "adapter", config, system_prompt=None)
    report = {
        "bench": "train_throughput",
        "model": str(args.model),
        "device": result.device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "lora_rank": args.rank,
        "steps": result.steps,
        "examples_per_step": args.batch_size * args.grad_accum,
        "tokens_per_example": round(result.tokens / max(1, result.examples), 1),
        "train_seconds": round(result.train_seconds, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "label_tokens": result.label_tokens,
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "final_loss": result.final_loss,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
