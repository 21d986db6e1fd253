"""Probes 13 and 18 of issue 16: no raw database errors reach the client; every prompt fits
the context window and /v1 message counts are capped."""

from __future__ import annotations

import sqlite3

import httpx
import pytest

from core.prompting import PromptTooLongError, fit_prompt
from core.types import ChatMessage
from tests.security.conftest import CONTEXT_TOKENS, client

pytestmark = pytest.mark.slow

_LEAK_MARKS = ("SQL", "INSERT", "sqlite", "parameters", "locked-canary", "Traceback")


def test_probe13_a_locked_database_shows_a_short_safe_message(anon_app):
    chat = client(anon_app)
    bid, _, history, *_ = chat.predict("", api_name="/load")
    lock = sqlite3.connect(anon_app.data_dir / "upc.db", timeout=5, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # every write of the app now waits, then fails
    try:
        send = chat.submit("locked-canary-1 hello", history, bid, api_name="/send")
        newcomer = client(anon_app).submit("", api_name="/load")  # has to insert a user
        _, kept, status, _ = send.result(timeout=180)
        with pytest.raises(Exception) as refused:  # any refusal; its text is checked below
            newcomer.result(timeout=180)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert "could not be saved" in status and len(kept) == len(history)
    for mark in _LEAK_MARKS:
        assert mark not in status and mark not in str(refused.value), mark
    log = anon_app.log_path.read_text()
    assert "database is locked" in log  # the details are in the log, only there
    _, after, status, _ = chat.predict("hello again", history, bid, api_name="/send")
    assert status == "" and len(after) == len(history) + 2


def _v1(app, messages: list[dict], max_tokens: int = 8) -> httpx.Response:
    return httpx.post(
        f"{app.base_url}/v1/chat/completions",
        json={"model": "upc", "messages": messages, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {app.api_key}"},
        timeout=120,
    )


def test_probe18_v1_caps_messages_and_fits_long_prompts(anon_app):
    too_many = _v1(anon_app, [{"role": "user", "content": "hi"}] * 65)
    assert too_many.status_code == 400 and "at most 64" in too_many.text
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 60}
        for i in range(63)
    ]
    long = _v1(anon_app, [{"role": "system", "content": "Be brief."}, *turns])
    assert long.status_code == 200, long.text
    assert long.json()["usage"]["prompt_tokens"] <= CONTEXT_TOKENS - 8
    alone = _v1(anon_app, [{"role": "user", "content": "word " * 700}])
    assert alone.status_code == 400 and "context window" in alone.text


def test_probe18_a_long_chat_history_is_cut_to_the_window(anon_app):
    chat = client(anon_app)
    bid, conversations, history, *_ = chat.predict("", api_name="/load")
    for i in range(8):
        _, history, status, _ = chat.predict(
            f"part {i}: " + "tell me more about the old harbour " * 12,
            history,
            bid,
            api_name="/send",
        )
        assert status == ""
    with sqlite3.connect(f"file:{anon_app.data_dir / 'upc.db'}?mode=ro", uri=True) as db:
        tokens = [
            n
            for (n,) in db.execute(
                "SELECT prompt_tokens FROM messages WHERE conversation_id = ? AND role = 'assistant'",
                (conversations["value"],),
            )
        ]
    assert len(tokens) == 9 and all(n is not None for n in tokens)
    assert max(tokens) <= CONTEXT_TOKENS - 8
    assert max(tokens) > CONTEXT_TOKENS // 2  # the history really was long enough to cut


def test_fit_prompt_keeps_the_system_prompt_and_the_last_message(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def count(messages) -> int:
        items = [{"role": m.role, "content": m.content} for m in messages]
        text = tokenizer.apply_chat_template(items, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    system = ChatMessage("system", "SYSTEM-MARK be kind")
    turns = [ChatMessage("user" if i % 2 == 0 else "assistant", f"t{i} " * 80) for i in range(20)]
    fitted = fit_prompt([system, *turns], count, 300)
    assert fitted[0] == system and fitted[-1] == turns[-1]
    assert count(fitted) <= 300 and len(fitted) < 21
    assert fitted[1:] == turns[-(len(fitted) - 1) :]  # the newest turns, in order
    with pytest.raises(PromptTooLongError):
        fit_prompt([system, ChatMessage("user", "x " * 500)], count, 300)
