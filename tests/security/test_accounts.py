"""Probes 1, 2, 7 and 8 of issue 16: sign-up, sessions, long passwords, login timing."""

from __future__ import annotations

import statistics
import time

import pytest

from chatbot.accounts import AccountError, Accounts
from storage import Database
from tests.security.conftest import (
    ADMIN,
    RESERVED_ADMIN,
    USER,
    cli,
    client,
    login,
    signed_in,
)

pytestmark = pytest.mark.slow


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def test_probe1_a_listed_admin_name_cannot_be_claimed_by_sign_up(password_app):
    refused = login(password_app, RESERVED_ADMIN, "attacker-pass-1")
    assert refused.status_code == 400
    with pytest.raises(ValueError, match="Could not login"):
        client(password_app, (RESERVED_ADMIN, "attacker-pass-1"))
    # Nothing was created: the operator can still make the real admin account.
    made = cli(password_app, "users", "add", RESERVED_ADMIN, "--password", "real-root-pass-1")
    assert made.returncode == 0, made.stderr
    admin = client(password_app, (RESERVED_ADMIN, "real-root-pass-1"))
    table, *_ = admin.predict("", api_name="/console_refresh")
    assert table["data"] is not None  # the listed name is an admin once it really exists
    # An ordinary new name still signs up, and is no admin.
    newcomer = client(password_app, ("newcomer", "newcomer-pass-1"))
    with pytest.raises(Exception, match="Operators only"):
        newcomer.predict("", api_name="/console_refresh")


def test_probe1_listed_admins_get_the_env_password_at_first_start(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'upc.db'}", data_dir=tmp_path)
    try:
        accounts = Accounts(db, admin_names=frozenset({"olga"}))
        with pytest.raises(AccountError, match="reserved"):
            accounts.register("olga", "attacker-pass-1")
        assert accounts.ensure_admins(None) == []
        assert accounts.ensure_admins("olga-first-pass") == ["olga"]
        olga = accounts.verify("olga", "olga-first-pass")
        assert olga is not None and olga.is_admin
        assert accounts.ensure_admins("another-pass-1") == []  # never overwrites
        assert accounts.verify("olga", "another-pass-1") is None
    finally:
        db.dispose()


def test_probe2_erasure_revokes_sessions_even_when_the_name_returns(password_app):
    victim = ("victim", "victim-pass-1")
    old = client(password_app, victim)  # signs up
    _, _, history, *_ = old.predict("", api_name="/load")
    old.predict("victim-canary-3318", history, "", api_name="/send")
    cookies = login(password_app, *victim).cookies
    assert signed_in(password_app, cookies)

    erased = cli(password_app, "erase", victim[0], "--yes")
    assert erased.returncode == 0, erased.stderr
    newcomer = client(password_app, (victim[0], "newcomer-pass-2"))  # the name, anew
    _, _, fresh, *_ = newcomer.predict("", api_name="/load")
    newcomer.predict("newcomer-canary-5521", fresh, "", api_name="/send")

    assert not signed_in(password_app, cookies)
    with pytest.raises(Exception, match=r"(?i)sign in|login|401|403|auth") as refused:
        old.predict("", api_name="/load")
    assert "newcomer-canary" not in str(refused.value)


def test_probe2_password_change_ends_every_session(password_app):
    who = ("pwuser", "pw-user-pass-1")
    session = client(password_app, who)
    session.predict("", api_name="/load")
    cookies = login(password_app, *who).cookies
    assert signed_in(password_app, cookies)

    changed = cli(password_app, "users", "passwd", who[0], "--password", "pw-user-pass-2")
    assert changed.returncode == 0, changed.stderr

    assert not signed_in(password_app, cookies)
    with pytest.raises(Exception, match=r"(?i)sign in|login|401|403|auth"):
        session.predict("", api_name="/load")
    assert login(password_app, who[0], who[1]).status_code == 400
    assert login(password_app, who[0], "pw-user-pass-2").status_code == 200


def test_probe7_overlong_passwords_get_a_clear_400(password_app):
    long_password = "p" * 100
    signup = login(password_app, "longpass", long_password)
    assert signup.status_code == 400
    assert "72 bytes" in signup.text
    # Sign-in of an existing account with any length is a plain refusal, never a crash.
    for password in (long_password, "é" * 40, "x" * 5000):
        r = login(password_app, USER[0], password)
        assert r.status_code == 400, (len(password), r.status_code, r.text[:200])
    assert login(password_app, USER[0], USER[1]).status_code == 200


def _login_ms(app, name: str, password: str) -> float:
    started = time.perf_counter()
    r = login(app, name, password)
    assert r.status_code == 400
    return 1000 * (time.perf_counter() - started)


def test_probe8_unknown_names_cost_the_same_as_known_ones(password_app):
    # Too short to register, so the unknown name is only checked, never signed up.
    wrong = "short1"
    known, unknown = [], []
    for i in range(7):
        known.append(_login_ms(password_app, ADMIN[0], wrong))
        unknown.append(_login_ms(password_app, f"nobody-{i}", wrong))
    k, u = statistics.median(known), statistics.median(unknown)
    assert 0.5 < u / k < 2.0, (k, u)
