"""The llama.cpp backend on the real embedded GGUF: a real xllamacpp server on localhost.

Prompt identity with the torch path, streaming, parallel slots, prefix caching, cancel,
timeouts, the busy error and the context window.
"""

import threading
import time

import pytest

from core.llamacpp_model import LlamaCppModel
from core.prompting import PromptTooLongError
from core.runtime import embedded_gguf_path
from core.types import ChatMessage, GenerationParams, ModelBusyError, ModelTimeoutError

pytestmark = pytest.mark.slow

SYSTEM = ChatMessage("system", "You are a friendly assistant. Keep replies short.")
GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0)


def _fixed(tokens: int, **kw) -> GenerationParams:
    """A reply of exactly `tokens` tokens (end-of-turn ignored), so requests overlap."""
    return GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def model():
    m = LlamaCppModel(embedded_gguf_path(), model_id="smollm2", n_parallel=4, ctx_tokens=2048)
    yield m
    m.close()


def _consume(stream):
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            return pieces, stop.value


CONVERSATIONS = [
    [ChatMessage("user", "Hi!")],
    [SYSTEM, ChatMessage("user", "I keep bees on my roof.")],
    [
        SYSTEM,
        ChatMessage("user", "I'm a nurse."),
        ChatMessage("assistant", "That sounds demanding! Which ward?"),
        ChatMessage("user", "Paediatrics, nights mostly. Ünïcödé ✓ and\nnew lines."),
    ],
]


def test_prompts_and_token_counts_are_the_torch_paths(model, embedded_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    for messages in CONVERSATIONS:
        items = [{"role": m.role, "content": m.content} for m in messages]
        text = tokenizer.apply_chat_template(items, add_generation_prompt=True, tokenize=False)
        assert model.format_prompt(messages) == text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert model.count_tokens(messages) == len(ids)


def test_stream_and_generate_give_the_same_greedy_reply(model):
    messages = CONVERSATIONS[1]
    done = model.generate(messages, GREEDY)
    pieces, final = _consume(model.stream(messages, GREEDY))
    assert done.text and len(pieces) >= 3
    assert "".join(pieces).strip() == final.text
    # The second run reuses the cached prompt, so its float sums differ a little from the
    # first's full prefill: the opening is the same, a late near-tie token may not be.
    assert final.text.split()[:3] == done.text.split()[:3]
    assert final.prompt_tokens == model.count_tokens(messages)
    assert 0 < final.completion_tokens <= GREEDY.max_new_tokens
    assert final.first_token_s is not None and final.model_id == "smollm2"


def test_four_requests_decode_at_once(model):
    params = _fixed(48)
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            stream = model.stream([SYSTEM, ChatMessage("user", f"Tell me fact {i}.")], params)
            start = time.perf_counter()
            _, final = _consume(stream)
            assert final.completion_tokens == 48
            spans.append((start + final.first_token_s, time.perf_counter()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(spans) == 4
    # Every reply had begun before any ended: four slots decoding together.
    assert max(first for first, _ in spans) < min(end for _, end in spans)


def test_next_turn_reuses_the_cached_prefix(model):
    first = [SYSTEM, ChatMessage("user", "I restore old motorbikes in my garage.")]
    done = model.generate(first, GREEDY)
    second = [*first, ChatMessage("assistant", done.text), ChatMessage("user", "Any tips?")]
    again = model.generate(second, GREEDY)
    assert again.extra["cached_prompt_tokens"] >= model.count_tokens(first) - 1
    assert again.extra["cached_prompt_tokens"] < again.prompt_tokens


def test_closing_the_stream_stops_the_slot(model):
    stream = model.stream([SYSTEM, ChatMessage("user", "Write a long story.")], _fixed(1500))
    for _ in range(3):
        assert next(stream)
    assert model.busy_slots() == 1
    stream.close()  # the browser went away
    deadline = time.monotonic() + 5
    while model.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model.busy_slots() == 0
    assert model.generate(CONVERSATIONS[0], GREEDY).text  # the slot serves again


def test_a_reply_past_its_deadline_times_out_and_frees_the_slot(model):
    # The prompt is cached first, so its first piece comes well inside the deadline even
    # on a loaded box, and what times out is the reply, not the prefill.
    model.generate(CONVERSATIONS[1], _fixed(1))
    stream = model.stream(CONVERSATIONS[1], _fixed(1500, timeout_s=1.0))
    pieces = []
    with pytest.raises(ModelTimeoutError):
        for piece in stream:
            pieces.append(piece)
    assert pieces, "the partial reply streamed before the deadline"
    deadline = time.monotonic() + 5
    while model.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model.busy_slots() == 0


def test_seeded_batches_repeat_and_rows_differ(model):
    params = GenerationParams(max_new_tokens=16, temperature=1.0, seed=7)
    convs = [CONVERSATIONS[1]] * 3
    a = [c.text for c in model.generate_batch(convs, params)]
    b = [c.text for c in model.generate_batch(convs, params)]
    assert a == b and len(set(a)) > 1
    seeded = model.generate_batch(convs[:2], params, seeds=[11, 11])
    assert seeded[0].text == seeded[1].text


@pytest.fixture(scope="module")
def small():
    """One slot, a queue of one, a 512-token window."""
    m = LlamaCppModel(embedded_gguf_path(), n_parallel=1, ctx_tokens=512, queue_size=1)
    yield m
    m.close()


def test_a_full_queue_answers_busy(small):
    long = _fixed(400)
    running = small.stream(CONVERSATIONS[1], long)
    assert next(running)
    queued = small.stream(CONVERSATIONS[0], long)
    waiter = threading.Thread(target=lambda: next(queued, None))
    waiter.start()
    deadline = time.monotonic() + 5
    while small.queue_depth() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ModelBusyError, match="busy"):
        next(small.stream(CONVERSATIONS[0], GREEDY))
    running.close()
    waiter.join(timeout=60)
    queued.close()
    assert small.generate(CONVERSATIONS[0], GREEDY).text  # room again


def test_prompts_are_fitted_to_the_window_oldest_turns_first(small):
    history = [SYSTEM]
    for i in range(20):
        history += [
            ChatMessage("user", f"Turn {i}: I like gardening, hiking and old films."),
            ChatMessage("assistant", f"Reply {i}: how lovely, tell me more about that."),
        ]
    history.append(ChatMessage("user", "What should I plant in spring?"))
    assert small.count_tokens(history) > small.context_tokens
    done = small.generate(history, GREEDY)
    assert done.text and done.prompt_tokens <= small.context_tokens - GREEDY.max_new_tokens
    with pytest.raises(PromptTooLongError, match="too long"):
        small.generate([SYSTEM, ChatMessage("user", "word " * 600)], GREEDY)
