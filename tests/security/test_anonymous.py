"""Probes 4 and 10 of issue 16: anonymous identities are secrets; /config holds none."""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import text

from chatbot.accounts import Accounts
from storage import Database
from tests.security.conftest import ADMIN_SECRET, client

pytestmark = pytest.mark.slow


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _files_under(root) -> list:
    return [p for p in root.rglob("*") if p.is_file()]


def test_probe4_nothing_the_console_shows_opens_a_browser(anon_app):
    victim = client(anon_app)
    bid, _, history, *_ = victim.predict("", api_name="/load")
    victim.predict("anon-canary-6604 is my secret", history, bid, api_name="/send")

    operator = client(anon_app)
    obid, *_ = operator.predict("", api_name="/load")
    operator.predict(ADMIN_SECRET, obid, api_name="/operator_sign_in")
    conversations, users = operator.predict("", obid, api_name="/console_conversations")
    assert bid not in json.dumps([conversations, users]), "the console shows a browser's secret"

    # Whatever names a user in the console, tried as a browser id, opens nothing of theirs.
    names = {str(row[1]) for row in conversations["data"]}
    candidates = names | {n.removeprefix("anon-") for n in names}
    candidates |= {str(row[0]) for row in conversations["data"]}
    attacker = client(anon_app)
    for candidate in sorted(candidates):
        issued, _, seen, *_ = attacker.predict(candidate, api_name="/load")
        assert issued != candidate
        assert not any("anon-canary-6604" in _text(m) for m in seen)
        with pytest.raises(Exception, match="browser session"):
            attacker.predict(candidate, api_name="/new_conversation")
    # The victim's own secret still works, and no file of the data dir holds it in clear.
    again = client(anon_app).predict(bid, api_name="/load")
    assert again[0] == bid and any("anon-canary-6604" in _text(m) for m in again[2])
    leaks = [p for p in _files_under(anon_app.data_dir) if bid.encode() in p.read_bytes()]
    assert leaks == []


def _config_text(app) -> str:
    r = httpx.get(f"{app.base_url}/config", timeout=30)
    if r.status_code == 404:
        r = httpx.get(f"{app.base_url}/gradio_api/config", timeout=30)
    r.raise_for_status()
    return r.text


def test_probe10_config_sends_no_secret_to_the_browser(anon_app):
    config = _config_text(anon_app)
    session_key = (anon_app.data_dir / "session.key").read_text().strip()
    assert len(session_key) >= 32
    for secret in (session_key, ADMIN_SECRET, anon_app.api_key):
        assert secret not in config


def test_probe4_old_databases_move_browser_secrets_to_hashes(tmp_path):
    """A database from before the fix named anonymous users after their browser's secret."""
    secret = "old-browser-secret-" + "3" * 20
    db = Database(f"sqlite:///{tmp_path / 'upc.db'}", data_dir=tmp_path)
    with db.engine.begin() as con:
        con.execute(
            text("INSERT INTO users (id, username, anonymous, is_admin, memory_enabled, "
                 "learning_opt_in, excluded_from_training, generation, created_at) VALUES "
                 "('u1', :name, 1, 0, 1, 1, 0, 0, CURRENT_TIMESTAMP)"),
            {"name": f"anon-{secret}"},
        )  # fmt: skip
        con.execute(text("DELETE FROM schema_migrations WHERE id = '0009_account_security'"))
    db.dispose()
    db = Database(f"sqlite:///{tmp_path / 'upc.db'}", data_dir=tmp_path)
    try:
        user = Accounts(db).anonymous(secret)
        assert user.id == "u1" and secret not in user.username
    finally:
        db.dispose()
    assert secret.encode() not in (tmp_path / "upc.db").read_bytes()
