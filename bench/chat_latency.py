"""Chat latency of the embedded model: TTFT for a 5-turn history, decode speed, and
aggregate throughput with 1 and 4 concurrent users (requests batch on the worker).

    python bench/chat_latency.py [--model DIR] [--runs 8] [--tokens 64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._record import record
from core.local_model import LocalModel
from core.prompting import load_prompt
from core.types import ChatMessage, GenerationParams

HISTORY = [
    ("assistant", "Hi there! What has kept you busy this week?"),
    ("user", "Mostly work. I'm a pediatric nurse, so the ward has been hectic."),
    ("assistant", "Winter wards are tough. Do night shifts or day shifts wear you out more?"),
    ("user", "Nights, definitely. I unwind by restoring old motorbikes."),
    ("assistant", "Restoration is great therapy. Which bike is on your bench right now?"),
    ("user", "A 1972 Honda CB350. The carburettors are giving me trouble."),
    ("assistant", "Old CB350 carbs often need their float heights set and jets cleaned."),
    ("user", "I cleaned the jets but it still idles rough."),
    ("assistant", "Check for vacuum leaks at the intake boots; they crack with age."),
    ("user", "Good idea, I'll check them tomorrow. Any tips for syncing the carbs?"),
]


def _messages(variant: int) -> list[ChatMessage]:
    msgs = [ChatMessage("system", str(load_prompt("upc_system")))]
    msgs += [ChatMessage(r, t) for r, t in HISTORY]  # type: ignore[arg-type]
    msgs[-1] = ChatMessage("user", f"{HISTORY[-1][1]} (question {variant})")
    return msgs


def _stream(model: LocalModel, variant: int, tokens: int) -> tuple[float, int, float]:
    params = GenerationParams(
        max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.7, seed=variant
    )
    started = time.perf_counter()
    first = None
    stream = model.stream(_messages(variant), params)
    while True:
        try:
            next(stream)
            if first is None:
                first = time.perf_counter() - started
        except StopIteration as stop:
            completion = stop.value
            break
    total = time.perf_counter() - started
    return first or total, completion.completion_tokens, total


def _concurrent(model: LocalModel, users: int, tokens: int, rounds: int) -> float:
    produced = []

    def worker(i: int) -> None:
        for r in range(rounds):
            _, n, _ = _stream(model, 1000 + i * 10 + r, tokens)
            produced.append(n)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(users)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(produced) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="model dir (default: materialize the embedded one)"
    )
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    model_dir = args.model
    if model_dir is None:
        from core.runtime import ensure_embedded_model
        from core.settings import load_settings

        model_dir = ensure_embedded_model(load_settings().models_dir)
    model = LocalModel(
        model_dir, model_id="SmolLM2-135M-Instruct", dtype=args.dtype, max_batch_size=8
    )
    _stream(model, 0, 8)  # warm-up
    ttfts, decode_rates = [], []
    for i in range(args.runs):
        first, n, total = _stream(model, i + 1, args.tokens)
        ttfts.append(first)
        decode_rates.append((n - 1) / max(total - first, 1e-9))
    one = _concurrent(model, 1, args.tokens, 2)
    four = _concurrent(model, 4, args.tokens, 2)
    model.close()
    ttfts.sort()
    record(
        "chat latency (embedded SmolLM2-135M, CPU)",
        {
            "benchmark": "chat_latency",
            "dtype": args.dtype,
            "prompt_tokens_5_turn_history": model.count_tokens(_messages(0)),
            "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
            "ttft_ms_p95": round(1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1),
            "decode_tokens_per_s": round(statistics.median(decode_rates), 1),
            "aggregate_tokens_per_s_1_user": round(one, 1),
            "aggregate_tokens_per_s_4_users": round(four, 1),
            "ratio_4_users_vs_1": round(four / one, 2),
            "targets": {"ttft_ms_p50": 300, "decode_tokens_per_s": 30, "ratio_4_users_vs_1": 2.0},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
