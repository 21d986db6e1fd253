import threading
import time

import pytest

from core.local_model import AdapterLoadError, LocalModel
from core.types import ChatMessage, GenerationParams, ModelBusyError, ModelTimeoutError
from tests.test_hotswap import _random_lora

MSGS = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hello there, I bake bread.")]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = LocalModel(
        tiny_model_dir, model_id="tiny", dtype="float32", max_batch_size=8, queue_size=4
    )
    yield model
    model.close()


def test_generate_stream_and_batch_agree_under_greedy_decoding(tiny):
    params = GenerationParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    single = tiny.generate(MSGS, params)
    assert single.completion_tokens > 0 and single.prompt_tokens == tiny.count_tokens(MSGS)
    stream = tiny.stream(MSGS, params)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            final = stop.value
            break
    assert "".join(pieces).strip() == single.text == final.text
    other = [ChatMessage("user", "A much longer and different opening message " * 3)]
    batch = tiny.generate_batch([MSGS, other, MSGS], params)
    # Left padding must not change what a row generates.
    assert batch[0].text == single.text == batch[2].text
    assert batch[1].text == tiny.generate(other, params).text
    assert batch[0].extra["batch_size"] == 3


def test_seeded_sampling_is_reproducible(tiny):
    params = GenerationParams(max_new_tokens=10, temperature=1.0, seed=7)
    assert tiny.generate(MSGS, params).text == tiny.generate(MSGS, params).text


def test_concurrent_requests_are_batched_together(tiny):
    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    gate = threading.Event()
    blocker = threading.Thread(target=tiny.run_exclusive, args=(lambda m, t: gate.wait(5),))
    blocker.start()
    time.sleep(0.1)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(tiny.generate(MSGS, params)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in [*threads, blocker]:
        t.join(30)
    assert len(results) == 3
    assert max(r.extra["batch_size"] for r in results) >= 2


def test_full_queue_answers_busy(tiny):
    gate = threading.Event()
    blocker = threading.Thread(target=tiny.run_exclusive, args=(lambda m, t: gate.wait(10),))
    blocker.start()
    time.sleep(0.1)
    params = GenerationParams(max_new_tokens=2)
    threads = [threading.Thread(target=tiny.generate, args=(MSGS, params)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    try:
        with pytest.raises(ModelBusyError, match="busy"):
            tiny.generate(MSGS, params)
    finally:
        gate.set()
        for t in [*threads, blocker]:
            t.join(30)


def test_timeout_mid_stream_keeps_the_partial_text(tiny):
    params = GenerationParams(max_new_tokens=200, temperature=1.0, seed=1, timeout_s=0.0)
    stream = tiny.stream(MSGS, params)
    got = []
    with pytest.raises(ModelTimeoutError):
        for piece in stream:
            got.append(piece)
    assert got, "the first token should have streamed before the timeout"


def test_pickle_adapter_is_refused_without_loading(tiny, tmp_path):
    adapter = tmp_path / "evil"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"not even read")
    with pytest.raises(AdapterLoadError, match="pickle"):
        tiny.load_adapter("evil", adapter)
    assert "evil" not in tiny.adapters
    # The model still serves.
    assert tiny.generate(MSGS, GenerationParams(max_new_tokens=3)).completion_tokens >= 0


def test_prefix_cache_reuses_the_previous_turn_without_changing_output(tiny_model_dir):
    cached = LocalModel(tiny_model_dir, dtype="float32", prefix_cache_size=4)
    plain = LocalModel(tiny_model_dir, dtype="float32", prefix_cache_size=0)
    params = GenerationParams(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0)
    history = list(MSGS)
    try:
        for turn in range(3):
            a, b = cached.generate(history, params), plain.generate(history, params)
            assert a.text == b.text
            if turn:
                assert a.extra["cached_prompt_tokens"] > len(cached.encode(MSGS)) - 2
            assert b.extra["cached_prompt_tokens"] == 0
            history += [ChatMessage("assistant", a.text), ChatMessage("user", f"more {turn}")]
    finally:
        cached.close()
        plain.close()


def test_seeded_batch_rows_differ_and_repeat_across_runs(tiny):
    params = GenerationParams(max_new_tokens=8, temperature=1.0, seed=3)
    first = [c.text for c in tiny.generate_batch([MSGS, MSGS, MSGS], params)]
    again = [c.text for c in tiny.generate_batch([MSGS, MSGS, MSGS], params)]
    assert first == again
    assert len(set(first)) > 1


def test_jobs_under_different_adapters_share_one_batch_and_match_alone(tiny_model_dir, tmp_path):
    """Base and two LoRA adapters decode in one batch (peft's mixed batch), and every row
    gives what it gives alone under its own adapter (greedy)."""
    model = LocalModel(tiny_model_dir, model_id="tiny", dtype="float32", max_batch_size=16)
    try:
        for i, name in enumerate(("one", "two")):
            model.load_adapter(name, _random_lora(tiny_model_dir, tmp_path / name, seed=i))
        params = GenerationParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.0)
        other = [ChatMessage("user", "Tell me about your garden and the weather today.")]
        jobs = [(MSGS, None), (MSGS, "one"), (other, "two"), (MSGS, "two"), (other, None)]
        alone = [model.generate(m, params, adapter=a).text for m, a in jobs]
        assert len({alone[0], alone[1], alone[3]}) == 3  # the adapters really differ
        gate = threading.Event()
        blocker = threading.Thread(target=model.run_exclusive, args=(lambda m, t: gate.wait(5),))
        blocker.start()
        time.sleep(0.1)
        results: dict[int, object] = {}

        def run(k: int) -> None:
            results[k] = model.generate(jobs[k][0], params, adapter=jobs[k][1])

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
        for t in threads:
            t.start()
        time.sleep(0.3)
        gate.set()
        for t in [*threads, blocker]:
            t.join(60)
        assert [results[k].text for k in range(len(jobs))] == alone
        assert [results[k].adapter_id for k in range(len(jobs))] == [
            "base", "one", "two", "two", "base",
        ]  # fmt: skip
        assert max(results[k].extra["batch_size"] for k in results) == len(jobs)
    finally:
        model.close()
