"""Probe 19 of issue 16: kill -9 in the middle of a streamed reply loses at most a second of
it; the next start shows it as interrupted."""

from __future__ import annotations

import signal
import sqlite3
import time

import pytest

from tests.security.conftest import client, stop_and_clean, tiny_app

pytestmark = pytest.mark.slow


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _rows(app, conversation_id: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(f"file:{app.data_dir / 'upc.db'}?mode=ro", uri=True) as db:
        return db.execute(
            "SELECT role, status, content FROM messages WHERE conversation_id = ? ORDER BY seq",
            (conversation_id,),
        ).fetchall()


def test_probe19_kill_9_mid_reply_keeps_the_partial_reply_as_interrupted(tmp_path, tiny_model_dir):
    # A long reply from the tiny model (seconds of decoding; with the prompt it must fit
    # its 2,048 positions), so the kill lands in the middle of it.
    app = tiny_app(tmp_path, tiny_model_dir, UPC_AUTH__MODE="anonymous")
    app.env["UPC_GENERATION__MAX_NEW_TOKENS"] = "1500"
    app.start()
    try:
        chat = client(app)
        bid, conversations, history, *_ = chat.predict("", api_name="/load")
        cid = conversations["value"]
        chat.submit("crash-canary-4410 tell me a long story", history, bid, api_name="/send")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = _rows(app, cid)
            if rows[-1][1] == "streaming" and len(rows[-1][2]) > 20:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no partial reply was saved: {_rows(app, cid)}")
        time.sleep(1.2)  # at least one more snapshot
        app.stop(signal.SIGKILL)
        roles_statuses = [(r, s) for r, s, _ in _rows(app, cid)]
        assert roles_statuses[-2:] == [("user", "complete"), ("assistant", "streaming")]
        partial = _rows(app, cid)[-1][2]

        app.start()
        rows = _rows(app, cid)
        assert rows[-1][:2] == ("assistant", "interrupted") and rows[-1][2] == partial
        _, _, shown, *_ = client(app).predict(bid, api_name="/load")
        assert "crash-canary-4410" in _text(shown[-2])
        assert "(interrupted)" in _text(shown[-1]) and partial[:20] in _text(shown[-1])
    finally:
        stop_and_clean(app, tmp_path)
