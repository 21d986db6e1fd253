"""`/v1` under load, through the real HTTP surface (the embedded model on llama.cpp with
one slot and a queue of one): a reply is computed off the event loop, so the rest of the
server keeps answering, and a full queue is a clean busy: 429, a message and Retry-After
(issue 16's load target allows no other failure)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import RunningApp, embedded_app

pytestmark = pytest.mark.slow

# Long replies, so that a request is still running when the next ones arrive.
LONG = {
    "messages": [{"role": "user", "content": "Count from 1 to 400, separated by commas."}],
    "max_tokens": 300,
}


@pytest.fixture(scope="module")
def one_slot_app(tmp_path_factory, embedded_model_dir):
    yield from embedded_app(
        tmp_path_factory.mktemp("one-slot"),
        embedded_model_dir,
        UPC_AUTH__MODE="anonymous",
        UPC_CHATBOT__BACKEND="llamacpp",
        UPC_LLAMACPP__N_PARALLEL="1",
        UPC_LIMITS__QUEUE_SIZE="1",
        UPC_MEMORY__ENABLED="false",
    )


def _ask(
    app: RunningApp,
    stream: bool,
    answers: list[httpx.Response],
    together: threading.Barrier | None = None,
) -> None:
    if together is not None:
        together.wait(timeout=60)  # on a loaded box threads start late: send at once
    r = httpx.post(
        f"{app.base_url}/v1/chat/completions",
        json={**LONG, "stream": stream},
        headers={"Authorization": f"Bearer {app.api_key}"},
        timeout=300,
    )
    answers.append(r)


def test_a_v1_reply_does_not_hold_up_the_server(one_slot_app):
    # Before: the handler generated on the event loop, and /healthz (every page too)
    # waited for the whole reply.
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=_ask, args=(one_slot_app, False, answers))
    asked = time.monotonic()
    caller.start()
    time.sleep(0.3)
    started = time.monotonic()
    health = httpx.get(f"{one_slot_app.base_url}/healthz", timeout=60)
    waited = time.monotonic() - started
    still_running = caller.is_alive()
    caller.join(timeout=300)
    reply_s = time.monotonic() - asked
    assert health.status_code == 200 and answers[0].status_code == 200
    assert still_running, "the reply ended before the health check: nothing was measured"
    # Held up, /healthz would wait for the rest of the reply; the bound is relative to
    # the reply so a loaded box (both slower) measures the same thing.
    assert waited < max(0.5, reply_s / 4), (
        f"/healthz took {waited:.2f} s of a {reply_s:.1f} s reply"
    )


def test_v1_answers_a_full_queue_with_429_and_retry_after(one_slot_app):
    answers: list[httpx.Response] = []
    # Eight at once against one slot and one queue place: six must be turned away.
    together = threading.Barrier(8)
    callers = [
        threading.Thread(target=_ask, args=(one_slot_app, n % 2 == 0, answers, together))
        for n in range(8)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=300)
    served = [r for r in answers if r.status_code == 200]
    busy = [r for r in answers if r.status_code == 429]
    assert len(served) + len(busy) == 8, [r.text[:200] for r in answers]
    assert len(busy) >= 6 and served
    for r in busy:
        assert int(r.headers["Retry-After"]) >= 1
        assert "busy" in r.json()["error"]["message"]
