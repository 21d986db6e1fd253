"""The real app on PostgreSQL (UPC_DATABASE_URL) and a Chroma server (UPC_CHROMA_URL):
no SQLite file appears, and /healthz reports memory degraded while Chroma is down, chat
still answering, then ok again once it is back."""

from __future__ import annotations

import os
import time

import httpx
from sqlalchemy import text

from storage import Database
from storage.migrations import MIGRATIONS
from tests.conftest import make_app


def _health(base_url: str) -> dict:
    return httpx.get(f"{base_url}/healthz", timeout=30).json()


def _wait_memory(base_url: str, state: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = _health(base_url)
        if health["memory"] == state:
            return health
        time.sleep(0.3)
    raise AssertionError(f"memory never became {state}: {health}")


def test_app_on_postgres_and_a_chroma_server(tmp_path, embedded_model_dir, postgres, chroma_server):
    data_dir = tmp_path / "upc-data"
    (data_dir / "models").mkdir(parents=True)
    os.symlink(embedded_model_dir, data_dir / "models" / embedded_model_dir.name)
    url = postgres.create_database()
    app = make_app(
        data_dir,
        tmp_path,
        UPC_AUTH__MODE="anonymous",
        UPC_DATABASE_URL=url,
        UPC_CHROMA_URL=chroma_server.url,
        UPC_MEMORY__RETRY_INTERVAL_S="0.5",
        UPC_MEMORY__CHROMA_TIMEOUT_S="2",
    )
    app.start()
    try:
        assert _health(app.base_url) == {"ok": True, "adapter": "base", "memory": "ok"}
        assert not (data_dir / "upc.db").exists()  # the records live in PostgreSQL
        db = Database(url)
        with db.engine.connect() as con:
            applied = con.execute(text("SELECT count(*) FROM schema_migrations")).scalar()
        db.dispose()
        assert applied == len(MIGRATIONS)

        chroma_server.stop()
        try:
            health = _wait_memory(app.base_url, "degraded")
            assert health["ok"] is True  # the replica stays in the load balancer's rotation
            reply = httpx.post(
                f"{app.base_url}/v1/chat/completions",
                json={"model": "upc", "messages": [{"role": "user", "content": "Hello!"}]},
                headers={"Authorization": f"Bearer {app.api_key}"},
                timeout=120,
            )
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        finally:
            chroma_server.start()
        _wait_memory(app.base_url, "ok")
        assert app.log_path is not None
        assert "memory index (Chroma) failed" in app.log_path.read_text()
    finally:
        app.stop()
        postgres.drop_database(url)
