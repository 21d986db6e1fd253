"""A full model queue answers `/v1` with a clean busy: 429, a message, and Retry-After
(issue 16's load target allows no other failure). Through the real HTTP surface, the
embedded model on llama.cpp with one slot and a queue of one."""

from __future__ import annotations

import os
import shutil
import threading
import time

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
        "max_tokens": 600,
        "stream": True,
    }
    url = f"{app.base_url}/v1/chat/completions"
    queued: list[int] = []

    def wait_in_queue() -> None:
        body = {**long, "stream": False}
        queued.append(httpx.post(url, json=body, headers=headers, timeout=300).status_code)

    try:
        with httpx.Client(headers=headers, timeout=120) as http:
            # A long stream takes the one slot; a second request waits in the queue.
            with http.stream("POST", url, json=long) as first:
                assert first.status_code == 200
                next(first.iter_lines())
                waiter = threading.Thread(target=wait_in_queue)
                waiter.start()
                time.sleep(1.5)
                for body in ({**long, "stream": False}, long):
                    r = httpx.post(url, json=body, headers=headers, timeout=60)
                    assert r.status_code == 429, r.text
                    assert int(r.headers["Retry-After"]) >= 1
                    assert "busy" in r.json()["error"]["message"]
            waiter.join(timeout=300)
        assert queued == [200]  # the queued request was served, not refused
    finally:
        app.stop()
        if os.environ.get("UPC_KEEP_TEST_LOGS") is None:
            shutil.rmtree(tmp_path, ignore_errors=True)
