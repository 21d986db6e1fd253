"""GPU proof of the QLoRA path: 4-bit NF4 base, train an adapter, hot-load it while
8 streams are running, generate with it. Prints JSON and appends it to docs/benchmarks.md.

    python bench/gpu_qlora.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data /tmp/gpu-data \
        [--sft runs/iter-001/sft.jsonl] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._record import record


def _concurrent_streams(model, manager, messages, params, n: int, stop: threading.Event):  # type: ignore[no-untyped-def]
    failures: list[str] = []
    done: list[str] = []

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                stream = model.stream(messages, params, adapter=manager.adapter_for(f"c{i}"))
                while True:
                    try:
                        next(stream)
                    except StopIteration as end:
                        done.append(end.value.adapter_id)
                        break
            except Exception as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, failures, done


def main() -> int:
    import torch

    from chatbot.adapters import AdapterManager
    from core.local_model import LocalModel
    from core.prompting import load_prompt
    from core.runtime import ensure_embedded_model
    from core.settings import load_settings
    from core.types import ChatMessage, GenerationParams
    from learner.registry import AdapterManifest, AdapterRegistry
    from learner.train import TrainConfig, train_adapter
    from storage import Database

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sft", type=Path, default=None)
    parser.add_argument("--dialogues", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    settings = load_settings(env={"UPC_DATA_DIR": str(args.data)})
    model_dir = ensure_embedded_model(settings.models_dir, args.gguf)
    db = Database.from_settings(settings)
    sft = args.sft
    if sft is None:
        from bench.train_throughput import _dialogues

        sft = args.data / "sft.jsonl"
        sft.write_text("".join(json.dumps(d) + "\n" for d in _dialogues(args.dialogues, 5, 0)))
    result: dict = {"benchmark": "gpu_qlora", "gpu": torch.cuda.get_device_name(0)}

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = LocalModel(
        model_dir, model_id="SmolLM2-135M-Instruct", device="cuda", load_in_4bit=True
    )
    result["serve_load_s"] = round(time.perf_counter() - started, 2)
    result["serve_4bit"] = model.quantized
    result["serve_linear_type"] = type(model.model.model.layers[0].self_attn.q_proj).__name__
    result["serve_gpu_mem_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    messages = [
        ChatMessage("system", str(load_prompt("upc_system"))),
        ChatMessage("assistant", "Hi! What has kept you busy lately?"),
        ChatMessage("user", "I'm a pediatric nurse and I restore old motorbikes."),
    ]
    greedy = GenerationParams(max_new_tokens=64, min_new_tokens=64, temperature=0.0)
    model.generate(messages, greedy)
    t0 = time.perf_counter()
    base_reply = model.generate(messages, greedy)
    result["serve_decode_tokens_per_s"] = round(
        base_reply.completion_tokens / (time.perf_counter() - t0), 1
    )

    config = TrainConfig.from_settings(settings.learner.train, epochs=args.epochs)
    torch.cuda.reset_peak_memory_stats()
    trained = train_adapter(
        model_dir, sft, args.data / "trained", config, progress_bar=True, iteration=1
    )
    result["train"] = {
        "device": trained.device,
        "examples": trained.examples,
        "steps": trained.steps,
        "tokens": trained.tokens,
        "tokens_per_s": round(trained.tokens_per_s, 1),
        "train_seconds": round(trained.train_seconds, 1),
        "final_loss": trained.final_loss,
        "peak_gpu_mem_mb": round(trained.peak_memory_mb, 1),
        "qlora": trained.config.get("load_in_4bit"),
        "optimizer": "paged_adamw_32bit",
    }
    registry = AdapterRegistry(settings.adapters_dir, db)
    manifest = registry.publish(
        trained.adapter_dir,
        AdapterManifest(
            id="gpu-iter-001",
            iteration=1,
            base_model_id="SmolLM2-135M-Instruct",
            training_config=trained.config,
            training_dialogue_ids=trained.dialogue_ids,
            metrics=trained.metrics(),
        ),
    )
    manager = AdapterManager(
        model, source=registry.active_id, resolve=registry.verified_path, poll_s=0.05
    )
    manager.start()
    stop = threading.Event()
    sample = GenerationParams(max_new_tokens=48, temperature=0.7)
    threads, failures, done = _concurrent_streams(model, manager, messages, sample, 8, stop)
    time.sleep(1.0)
    registry.activate(manifest.id)
    t0 = time.perf_counter()
    while manager.active != manifest.id and time.perf_counter() - t0 < 60:
        time.sleep(0.01)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(120)
    result["hot_swap"] = {
        "swap_s": round(manager.last_swap_s or -1, 3),
        "concurrent_streams": 8,
        "requests_completed": len(done),
        "requests_failed": len(failures),
        "served_by_new_adapter": sum(1 for a in done if a == manifest.id),
    }
    tuned = model.generate(messages, greedy, adapter=manifest.id)
    result["base_reply"] = base_reply.text
    result["adapter_reply"] = tuned.text
    result["adapter_changes_output"] = tuned.text != base_reply.text
    manager.stop()
    model.close()
    record("GPU QLoRA proof (SmolLM2-135M, 4-bit NF4)", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
