"""Decode throughput of the local backend against plain `transformers` generate.

Both decode the same left-padded chat prompts (distinct users, each asked ``--copies``
times as best-of-n does) with the same sampling settings; new tokens/s counts only the
tokens each row really generated (up to its end-of-turn). Prints one JSON object.

Usage (GPU): python bench/gpu/decode_throughput.py --users 500 --copies 4 --hf-batch 512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from core.local_model import LocalModel
from core.prompting import load_prompt
from core.runtime import ensure_embedded_model
from core.settings import load_settings
from core.types import ChatMessage, GenerationParams
from personas.catalog import load_shipped


def _conversations(users: int) -> list[list[ChatMessage]]:
    system = str(load_prompt("upc_system"))
    out = []
    for persona in load_shipped()[:users]:
        out.append(
            [
                ChatMessage("system", system),
                ChatMessage("assistant", "Hi! What has your week been like so far?"),
                ChatMessage("user", persona.background),
            ]
        )
    return out


def _hf_generate(model, tokenizer, prompts, params, batch: int, stop_ids) -> tuple[int, float]:
    """Plain `model.generate` in batches; returns (new tokens up to end-of-turn, seconds)."""
    new, started = 0, time.perf_counter()
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        width = max(len(p) for p in part)
        ids = torch.full((len(part), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(part):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=params.max_new_tokens,
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                repetition_penalty=params.repetition_penalty,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(stop_ids),
            )
        for row in out[:, width:].tolist():
            n = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
            new += n
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return new, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--hf-batch", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--gguf", default=None, help="materialise the embedded model from it")
    args = parser.parse_args()
    settings = load_settings()
    model_dir = ensure_embedded_model(settings.models_dir, Path(args.gguf) if args.gguf else None)
    lm = LocalModel(model_dir, model_id="embedded", load_in_4bit=False, max_batch_size=1 << 16)
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9, timeout_s=3600
    )
    convs = [c for c in _conversations(args.users) for _ in range(args.copies)]
    seeds = list(range(len(convs)))
    lm.generate_batch(convs[:8], params, seeds=seeds[:8])  # warm-up
    started = time.perf_counter()
    done = lm.generate_batch(convs, params, seeds=seeds)
    ours_s = time.perf_counter() - started
    ours_tokens = sum(c.completion_tokens for c in done)
    prompts = [lm.encode(c) for c in convs]
    stop_ids = set(lm._stop_ids)
    hf_tokens, hf_s = _hf_generate(lm.model, lm.tokenizer, prompts, params, args.hf_batch, stop_ids)
    result = {
        "rows": len(convs),
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "ours_new_tokens": ours_tokens,
        "ours_s": round(ours_s, 2),
        "ours_tokens_per_s": round(ours_tokens / ours_s, 1),
        "ours_cap_hits": sum(c.finish_reason == "length" for c in done),
        "hf_batch": args.hf_batch,
        "hf_new_tokens": hf_tokens,
        "hf_s": round(hf_s, 2),
        "hf_tokens_per_s": round(hf_tokens / hf_s, 1),
        "speedup": round((ours_tokens / ours_s) / (hf_tokens / hf_s), 2),
        "device": lm.device,
    }
    lm.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
