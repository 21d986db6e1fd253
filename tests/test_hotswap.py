"""Hot-loading adapters into a serving model: zero failed requests, logits change, refusal."""

import threading
import time

import pytest
import torch

from chatbot.adapters import AdapterManager
from core.local_model import LocalModel
from core.types import ChatMessage, GenerationParams
from learner.registry import AdapterRegistry, AdapterVerificationError
from storage import Database

MSGS = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi, I keep bees.")]


def _random_lora(base_dir, out_dir, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(20)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def setup(tmp_path, data_dir, tiny_model_dir):
    db = Database(f"sqlite:///{data_dir}/upc.db", data_dir=data_dir)
    registry = AdapterRegistry(data_dir / "adapters", db)
    for i, name in enumerate(("one", "two")):
        src = _random_lora(tiny_model_dir, tmp_path / f"src-{name}", seed=i)
        registry.import_dir(src, adapter_id=name)
    model = LocalModel(tiny_model_dir, model_id="tiny", max_batch_size=8, queue_size=32)
    manager = AdapterManager(
        model, source=registry.active_id, resolve=registry.verified_path, poll_s=0.1
    )
    yield registry, model, manager
    manager.stop()
    model.close()
    db.dispose()


def _logits(model, adapter):
    ids = torch.tensor([model.encode(MSGS)])

    def run(m, _tok):
        from contextlib import nullcontext

        ctx = (
            m.disable_adapter() if adapter is None and hasattr(m, "peft_config") else nullcontext()
        )
        if adapter is not None:
            m.set_adapter(adapter)
        with torch.inference_mode(), ctx:
            return m(input_ids=ids).logits[0, -1].clone()

    return model.run_exclusive(run)


def test_activated_adapter_changes_served_logits_and_base_is_restored(setup):
    registry, model, manager = setup
    base = _logits(model, None)
    manager.start()
    registry.activate("one")
    deadline = time.time() + 20
    while manager.active != "one" and time.time() < deadline:
        time.sleep(0.05)
    assert manager.active == "one" and "one" in model.adapters
    assert not torch.allclose(_logits(model, "one"), base, atol=1e-4)
    assert torch.allclose(_logits(model, None), base, atol=1e-5)
    reply = model.generate(MSGS, GenerationParams(max_new_tokens=4), adapter=manager.active)
    assert reply.adapter_id == "one"


def test_hot_swap_under_eight_concurrent_streams_has_zero_failures(setup):
    registry, model, manager = setup
    manager.start()
    failures, finished, adapters_used = [], [], []
    params = GenerationParams(max_new_tokens=24, temperature=1.0, seed=1, min_new_tokens=24)

    def client(i):
        for _ in range(3):
            adapter = manager.adapter_for(f"conv-{i}")
            try:
                stream = model.stream(MSGS, params, adapter=adapter)
                while True:
                    try:
                        next(stream)
                    except StopIteration as stop:
                        adapters_used.append(stop.value.adapter_id)
                        break
                finished.append(i)
            except Exception as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    swaps = []
    for target in ("one", "two", "base", "two"):
        registry.activate(target)
        started = time.perf_counter()
        while manager.active != target and time.perf_counter() - started < 20:
            time.sleep(0.02)
        swaps.append(manager.active)
        time.sleep(0.2)
    for t in threads:
        t.join(120)
    assert failures == []
    assert len(finished) == 24
    assert swaps == ["one", "two", "base", "two"]
    assert manager.last_swap_s is not None and manager.last_swap_s < 10
    # The old adapter "one" was unloaded once nothing used it.
    deadline = time.time() + 10
    while "one" in model.adapters and time.time() < deadline:
        model.run_exclusive(lambda m, t: None)
        time.sleep(0.05)
    assert "one" not in model.adapters and "two" in model.adapters


def test_corrupt_adapter_is_refused_and_current_keeps_serving(setup):
    registry, model, manager = setup
    manager.start()
    registry.activate("one")
    deadline = time.time() + 20
    while manager.active != "one" and time.time() < deadline:
        time.sleep(0.05)
    weights = registry.path("two") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(AdapterVerificationError):
        registry.activate("two")
    manager.sync()
    assert manager.active == "one"
    assert (
        model.generate(MSGS, GenerationParams(max_new_tokens=3), adapter="one").adapter_id == "one"
    )
