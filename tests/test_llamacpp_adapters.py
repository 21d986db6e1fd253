"""LoRA adapters in the llama.cpp backend, on the real embedded GGUF and real servers.

Adapters are published by the registry, which writes their GGUF LoRA (core.gguf_lora).
Each request picks its adapter; a newly activated one is hot-swapped in by a second
server while 8 streams keep going, with no failed request; a LoRA that doesn't fit the
model is refused while the previous adapter keeps serving.
"""

import re
import threading
import time
from collections import Counter

import pytest
import torch

from chatbot.adapters import ABSplit, AdapterManager
from core.gguf_lora import write_gguf_lora
from core.llamacpp_model import LlamaCppModel
from core.peft_loading import AdapterLoadError
from core.runtime import embedded_gguf_path
from core.types import BASE_ADAPTER, ChatMessage, GenerationParams
from learner.registry import AdapterRegistry
from storage import Database

pytestmark = pytest.mark.slow

MSGS = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi, I keep bees.")]
GREEDY = GenerationParams(max_new_tokens=16, temperature=0.0)


def _random_lora(base_dir, out_dir, seed, scale=20.0):
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
                param.mul_(scale)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory, embedded_model_dir, tiny_model_dir):
    root = tmp_path_factory.mktemp("llamacpp-adapters")
    db = Database(f"sqlite:///{root}/upc.db", data_dir=root)
    registry = AdapterRegistry(root / "adapters", db)
    for seed, name in enumerate(("one", "two", "three", "four")):
        src = _random_lora(embedded_model_dir, root / f"src-{name}", seed=seed, scale=0.5)
        registry.import_dir(src, adapter_id=name, base_config=embedded_model_dir)
    # A LoRA for another model (the tiny 2-layer one): its GGUF converts, but can't fit.
    registry.import_dir(
        _random_lora(tiny_model_dir, root / "src-tiny", seed=5),
        adapter_id="tiny",
        base_config=tiny_model_dir,
    )
    model = LlamaCppModel(embedded_gguf_path(), model_id="smollm2", n_parallel=4)
    gguf = model.gguf_path
    manager = AdapterManager(
        model,
        source=registry.active_id,
        resolve=lambda adapter_id: registry.gguf_path(adapter_id, base_config=gguf),
        poll_s=0.05,
        on_failure=lambda wanted, serving, exc: registry.revert_failed(wanted, serving, str(exc)),
    )
    yield registry, model, manager, root
    manager.stop()
    model.close()
    db.dispose()


def _reply(model, adapter):
    return model.generate(MSGS, GREEDY, adapter=adapter).text


def _opening(text: str) -> str:
    """A reply's first words: what an adapter changes, and what stays put when a cached
    prompt or a batch shifts the float sums (a late near-tie token may flip then)."""
    return " ".join(text.split()[:3])


def _wait(predicate, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_each_request_picks_its_adapter(env):
    registry, model, _, _ = env
    base = _reply(model, None)
    for name in ("one", "two"):
        model.load_adapter(name, registry.gguf_path(name))
    assert model.adapters == ["one", "two"]
    one, two = _reply(model, "one"), _reply(model, "two")
    openings = {BASE_ADAPTER: _opening(base), "one": _opening(one), "two": _opening(two)}
    assert len(set(openings.values())) == 3, "each adapter changes the greedy reply"
    # Concurrent requests for different adapters (A/B, console compare) each get their own.
    results: list[tuple[str, str]] = []

    def ask(adapter):
        results.append((adapter or BASE_ADAPTER, _reply(model, adapter)))

    threads = [threading.Thread(target=ask, args=(a,)) for a in (None, "one", "two") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 9
    assert all(_opening(text) == openings[adapter] for adapter, text in results), results
    for name in ("one", "two"):
        model.unload_adapter(name)


def test_ab_split_routes_conversations_to_their_adapter(env):
    registry, model, manager, _ = env
    model.load_adapter("one", registry.gguf_path("one"))
    model.load_adapter("two", registry.gguf_path("two"))
    manager.activate("one")
    manager.set_ab(ABSplit("two", 0.5))
    try:
        routed = {cid: manager.adapter_for(cid) for cid in (f"c{i}" for i in range(12))}
        assert set(routed.values()) == {"one", "two"}
        expected = {name: _opening(_reply(model, name)) for name in ("one", "two")}
        assert expected["one"] != expected["two"]
        for adapter in routed.values():
            done = model.generate(MSGS, GREEDY, adapter=adapter)
            assert done.adapter_id == adapter and _opening(done.text) == expected[adapter]
    finally:
        manager.set_ab(None)
        manager.activate(BASE_ADAPTER)


def test_hot_swap_under_eight_streams_fails_no_request(env):
    registry, model, manager, _ = env
    registry.activate(BASE_ADAPTER)
    manager.start()
    params = GenerationParams(max_new_tokens=24, temperature=0.7)
    stop = threading.Event()
    failures: list[str] = []
    served: Counter = Counter()

    def user(i: int) -> None:
        n = 0
        while not stop.is_set():
            adapter = manager.adapter_for(f"user-{i}-{n}")
            n += 1
            try:
                pieces = []
                stream = model.stream(MSGS, params, adapter=adapter)
                while True:
                    try:
                        pieces.append(next(stream))
                    except StopIteration as done:
                        final = done.value
                        break
                assert final.text == "".join(pieces).strip() and final.adapter_id == adapter
                served[adapter] += 1
            except Exception as exc:
                failures.append(f"{adapter}: {exc!r}")

    users = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in users:
        t.start()
    swaps = []
    try:
        # Adapters no server of this model has held yet: each swap starts a new server.
        time.sleep(1.5)
        old_pid = model.server_pid
        registry.activate("three")
        assert _wait(lambda: manager.active == "three"), manager.last_error
        swaps.append(manager.last_swap_s)
        # The old server drains its streams, then its process ends.
        assert _wait(lambda pid=old_pid: not _alive(pid), 60), "old server never closed"
        # A new candidate is prepared while the streams go on (the same kind of swap, off
        # the activation path); activating it then starts nothing.
        manager.prepare_every_s = 0.0
        manager.prepare_source = lambda: ["four"]
        old_pid = model.server_pid
        assert _wait(lambda: model.server_pid != old_pid, 60), "four was never prepared"
        assert _wait(lambda pid=old_pid: not _alive(pid), 60), "old server never closed"
        time.sleep(1.5)
        prepared_pid = model.server_pid
        registry.activate("four")
        assert _wait(lambda: manager.active == "four"), manager.last_error
        swaps.append(manager.last_swap_s)
        assert model.server_pid == prepared_pid, "activating a prepared adapter restarted"
        assert _wait(lambda: served["four"] > 0, 120), served
    finally:
        manager.prepare_source = None
        stop.set()
        for t in users:
            t.join(timeout=120)
    assert failures == []
    assert served[BASE_ADAPTER] and served["three"] and served["four"], served
    assert all(s is not None for s in swaps)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_lora_for_another_model_is_refused_and_the_old_adapter_serves(env):
    registry, model, manager, root = env
    manager.start()
    registry.activate("one")
    assert _wait(lambda: manager.active == "one")
    before = _opening(_reply(model, "one"))
    # Loaded directly: a clear error naming the misfit.
    tiny_gguf = write_gguf_lora(registry.path("tiny"), root / "tiny.gguf")
    with pytest.raises(AdapterLoadError, match="do not fit"):
        model.load_adapter("tiny", tiny_gguf.path)
    garbage = root / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(AdapterLoadError, match="not a readable GGUF"):
        model.load_adapter("garbage", garbage)
    # Activated through the registry: the app keeps serving "one" and ACTIVE points back.
    registry.activate("tiny")
    assert _wait(lambda: manager.last_error is not None and registry.active_id() == "one")
    # The registry's check ("does not fit") or the server's ("do not fit") refuses it.
    assert re.search(r"do(es)? not fit", manager.last_error), manager.last_error
    assert manager.active == "one" and "tiny" not in model.adapters
    assert _opening(_reply(model, "one")) == before
