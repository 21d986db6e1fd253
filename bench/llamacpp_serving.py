"""Chat serving through llama.cpp against the torch path, side by side in one run, plus the
adapter hot-swap under 8 concurrent streams.

Both backends answer the same 5-turn history (about 400 prompt tokens) with the same
sampling: TTFT with the history's prefix cached, single-user decode speed, and aggregate
tokens/s with 4 users against 1. The swap activates a new LoRA (converted by
core.gguf_lora) while 8 streams run, cold (a new server starts) and prepared (the serving
server already holds it, as the app arranges for new candidates); its time is what
`AdapterManager.activate` takes for the caller.

    python bench/llamacpp_serving.py [--runs 8] [--tokens 64] [--swaps 4]
        [--torch-dtypes auto,float32] [--gguf PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._record import record
from bench.chat_latency import _messages, _stream
from chatbot.adapters import AdapterManager
from core.gguf_lora import write_gguf_lora
from core.llamacpp_model import LlamaCppModel
from core.local_model import LocalModel
from core.runtime import embedded_gguf_path, ensure_embedded_model
from core.settings import load_settings
from core.types import BASE_ADAPTER, ChatMessage, GenerationParams


def _user_messages(user: int, turn: int) -> list[ChatMessage]:
    """User `user`'s own conversation (the history with their name in it), next question."""
    msgs = _messages(turn)
    msgs[1] = ChatMessage("assistant", f"Hi {NAMES[user]}! What has kept you busy this week?")
    return msgs


NAMES = ["Ana", "Bo", "Chidi", "Dana", "Eero", "Fay", "Gus", "Hana"]


def _users(model, users: int, tokens: int, rounds: int) -> float:
    """Aggregate tokens/s of `users` people each continuing their own conversation, whose
    earlier turns the server has seen (as in a chat: each new turn extends the last)."""
    produced: list[int] = []

    def user(i: int, timed: bool, first_turn: int) -> None:
        for r in range(rounds if timed else 1):
            params = GenerationParams(
                max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.7, seed=100 * i + r
            )
            stream = model.stream(_user_messages(i, first_turn + r), params)
            while True:
                try:
                    next(stream)
                except StopIteration as stop:
                    if timed:
                        produced.append(stop.value.completion_tokens)
                    break

    def run(timed: bool, first_turn: int) -> float:
        threads = [threading.Thread(target=user, args=(i, timed, first_turn)) for i in range(users)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - started

    run(False, 0)  # each user's earlier turns: their conversation is now known
    elapsed = run(True, 1)
    return sum(produced) / elapsed


def _serving(model, runs: int, tokens: int) -> dict:
    _stream(model, 0, 8)  # warm-up: loads the weights, caches the history's prefix
    ttfts, rates = [], []
    for i in range(runs):
        first, n, total = _stream(model, i + 1, tokens)
        ttfts.append(first)
        rates.append((n - 1) / max(total - first, 1e-9))
    one = _users(model, 1, tokens, 3)
    four = _users(model, 4, tokens, 3)
    ttfts.sort()
    return {
        "prompt_tokens_5_turn_history": model.count_tokens(_messages(0)),
        "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
        "ttft_ms_p95": round(1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1),
        "decode_tokens_per_s": round(statistics.median(rates), 1),
        "aggregate_tokens_per_s_1_user": round(one, 1),
        "aggregate_tokens_per_s_4_users": round(four, 1),
        "ratio_4_users_vs_1": round(four / one, 2),
    }


def _random_lora(base_dir: Path, out_dir: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(out_dir)
    return write_gguf_lora(out_dir, out_dir / "adapter_model.gguf", base_config=base_dir).path


def _hot_swap(model: LlamaCppModel, base_dir: Path, swaps: int, streams: int) -> dict:
    """Activate `swaps` new adapters under `streams` concurrent streams, each one first cold
    (a new server starts on activation) and then prepared (held by the serving server
    before activation, as the app does for new candidates); both kinds in one run."""
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"a{i}" for i in range(2 * swaps)]
        loras = {name: _random_lora(base_dir, Path(tmp) / name, i) for i, name in enumerate(names)}
        manager = AdapterManager(model, resolve=loras.__getitem__)
        stop = threading.Event()
        failures: list[str] = []
        served = [0]
        params = GenerationParams(max_new_tokens=32, temperature=0.7)
        messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi, I keep bees.")]

        def user(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                adapter = manager.adapter_for(f"user-{i}-{n}")
                try:
                    for _ in model.stream(messages, params, adapter=adapter):
                        pass
                    served[0] += 1
                except Exception as exc:
                    failures.append(repr(exc))

        threads = [threading.Thread(target=user, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        cold, prepared, prepare_s = [], [], []
        try:
            for k in range(swaps):
                time.sleep(2.0)  # every stream is mid-reply
                cold.append(manager.activate(names[2 * k]))
                time.sleep(2.0)
                started = time.perf_counter()
                model.prepare_adapters({names[2 * k + 1]: loras[names[2 * k + 1]]})
                prepare_s.append(time.perf_counter() - started)
                time.sleep(2.0)
                prepared.append(manager.activate(names[2 * k + 1]))
            time.sleep(2.0)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=300)
            manager.activate(BASE_ADAPTER)

    def summary(times: list[float]) -> dict:
        return {
            "swap_s": [round(t, 4) for t in times],
            "swap_s_median": round(statistics.median(times), 4),
            "swap_s_max": round(max(times), 4),
        }

    return {
        "concurrent_streams": streams,
        "cold": summary(cold),
        "prepared": summary(prepared),
        "prepare_s_in_background": [round(t, 3) for t in prepare_s],
        "prepared_vs_cold_median": round(statistics.median(prepared) / statistics.median(cold), 5),
        "requests_served": served[0],
        "failed_requests": len(failures),
        "failures": failures[:5],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--gguf", default=None, help="GGUF to serve (default: the shipped Q4_1)")
    parser.add_argument(
        "--torch-dtypes", default="auto", help="torch runs, comma-separated ('' for none)"
    )
    args = parser.parse_args()
    model_dir = ensure_embedded_model(load_settings().models_dir)
    gguf = Path(args.gguf) if args.gguf else embedded_gguf_path()
    llama = LlamaCppModel(gguf, model_id=gguf.name, n_parallel=4)
    try:
        result: dict = {"benchmark": "llamacpp_serving", "gguf": gguf.name}
        result["llamacpp"] = {
            "start_s": round(llama.last_swap_s, 2),
            **_serving(llama, args.runs, args.tokens),
        }
        for dtype in filter(None, args.torch_dtypes.split(",")):
            torch_model = LocalModel(
                model_dir, model_id="SmolLM2-135M-Instruct", dtype=dtype, max_batch_size=8
            )
            try:
                measured = _serving(torch_model, args.runs, args.tokens)
                result[f"torch_{dtype}"] = {"dtype": str(torch_model.dtype), **measured}
            finally:
                torch_model.close()
            result[f"decode_llamacpp_vs_torch_{dtype}"] = round(
                result["llamacpp"]["decode_tokens_per_s"] / measured["decode_tokens_per_s"], 2
            )
        result["hot_swap"] = _hot_swap(llama, model_dir, args.swaps, streams=8)
    finally:
        llama.close()
    result["targets"] = {
        "decode_tokens_per_s": 50,
        "decode_llamacpp_vs_torch_auto": 4.0,
        "ttft_ms_p50": 150,
        "ratio_4_users_vs_1": 2.0,
        "prepared_swap_s_max": 1.0,
        "failed_requests": 0,
    }
    record("llama.cpp serving vs torch (embedded SmolLM2-135M, CPU)", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
