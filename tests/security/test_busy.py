"""A full model queue answers `/v1` with a clean busy: 429, a message, and Retry-After
(issue 16's load target allows no other failure). Through the real HTTP surface, the
embedded model on llama.cpp with one slot and a queue of one."""

from __future__ import annotations

import os
import shutil
import threading

import httpx
import pytest

from tests.conftest import make_app

pytestmark = pytest.mark.slow


def test_v1_answers_a_full_queue_with_429_and_retry_after(tmp_path, embedded_model_dir):
    data_dir = tmp_path / "upc-data"
    (data_dir / "models").mkdir(parents=True)
    os.symlink(embedded_model_dir, data_dir / "models" / embedded_model_dir.name)
    app = make_app(
        data_dir,
        tmp_path,
        UPC_AUTH__MODE="anonymous",
        UPC_CHATBOT__BACKEND="llamacpp",
        UPC_LLAMACPP__N_PARALLEL="1",
        UPC_LIMITS__QUEUE_SIZE="1",
        UPC_MEMORY__ENABLED="false",
    )
    app.start()
    headers = {"Authorization": f"Bearer {app.api_key}"}
    long = {
        "messages": [{"role": "user", "content": "Tell me a very long story about bread."}],
        "max_tokens": 300,
    }
    url = f"{app.base_url}/v1/chat/completions"
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def ask(stream: bool) -> None:
        r = httpx.post(url, json={**long, "stream": stream}, headers=headers, timeout=300)
        with lock:
            answers.append(r)

    try:
        # Eight at once against one slot and one queue place: six must be turned away.
        callers = [threading.Thread(target=ask, args=(n % 2 == 0,)) for n in range(8)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(timeout=300)
        served = [r for r in answers if r.status_code == 200]
        busy = [r for r in answers if r.status_code == 429]
        assert len(answers) == 8 and len(served) + len(busy) == 8, [r.text for r in answers]
        assert len(busy) >= 6 and served
        for r in busy:
            assert int(r.headers["Retry-After"]) >= 1
            assert "busy" in r.json()["error"]["message"]
    finally:
        app.stop()
        if os.environ.get("UPC_KEEP_TEST_LOGS") is None:
            shutil.rmtree(tmp_path, ignore_errors=True)
