"""Where a decode step's time goes: torch.profiler over one batched generate call.

Prints the top operators by device and by host time. Usage (GPU, after the embedded model
is materialised): python bench/gpu/decode_profile.py --users 500 --copies 4 --tokens 24
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from bench.gpu.decode_throughput import _conversations
from core.decoding import DecodeRow, decode_rows
from core.local_model import LocalModel
from core.runtime import ensure_embedded_model
from core.settings import load_settings
from core.types import GenerationParams


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    model_dir = ensure_embedded_model(load_settings().models_dir)
    lm = LocalModel(model_dir, model_id="embedded", load_in_4bit=False, max_batch_size=1 << 16)
    params = GenerationParams(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    convs = [c for c in _conversations(args.users) for _ in range(args.copies)]
    lm.generate_batch(convs[:8], params)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    rows = [
        DecodeRow(lm.encode(c), args.tokens, args.tokens, 0.7, 0.9, 1.15, seed=k)
        for k, c in enumerate(convs)
    ]
    # On this thread (not the model's worker), so the profiler sees the operators too.
    with profile(activities=activities, record_shapes=True) as prof, torch.inference_mode():
        decode_rows(
            lm.model,
            rows,
            pad_id=lm.tokenizer.pad_token_id,
            stop_ids=sorted(lm._stop_ids),
            device=lm.device,
            cache=DynamicCache(),
        )
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    # Operators (with their input shapes), so each kernel's time has a name and a size.
    ops = prof.key_averages(group_by_input_shape=True)
    print(
        ops.table(sort_by=key, row_limit=30, max_name_column_width=40, max_shapes_column_width=90)
    )
    lm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
