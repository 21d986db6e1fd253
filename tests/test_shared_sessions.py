"""Sessions, the sign-in throttle and rate limits live in the database: every app process on
one database honours them, and a restarted process forgets none of them (issue 18)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gradio_client import Client
from sqlalchemy import select

from chatbot.accounts import Accounts
from chatbot.limits import LimitReached, LoginThrottle, SlidingWindows, WindowLimit
from chatbot.sessions import SessionTokens, cookie_id
from storage import Database
from storage.models import RateWindowRow, WebSessionRow
from tests.security.conftest import cli, login, signed_in, stop_and_clean, tiny_app


def test_windows_hold_across_processes_and_count_all_or_nothing(db_url, data_dir):
    dbs = [Database(db_url, data_dir=data_dir) for _ in range(2)]  # two engines, two pools
    try:
        windows = [SlidingWindows(db) for db in dbs]
        limit = WindowLimit("user:u1", 5, 60.0, "You")
        taken, refused = [], []
        start = threading.Barrier(12)

        def send(i: int) -> None:
            start.wait()
            try:
                windows[i % 2].take([limit])
                taken.append(i)
            except LimitReached as exc:
                refused.append(exc.wait_s)

        with ThreadPoolExecutor(12) as pool:
            list(pool.map(send, range(12)))
        assert len(taken) == 5 and len(refused) == 7
        assert all(0 < wait <= 60 for wait in refused)
        # One limit refusing means nothing is counted against the others.
        roomy = WindowLimit("addr:10.0.0.7", 100, 60.0, "Your network")
        with pytest.raises(LimitReached):
            windows[0].take([roomy, limit])
        assert windows[1].count("addr:10.0.0.7", 60.0) == 0
        with dbs[0].session() as s:
            keys = list(s.scalars(select(RateWindowRow.key)))
        assert keys and not any("u1" in k or "user" in k for k in keys)  # hashes only
    finally:
        for db in dbs:
            db.dispose()


def test_windows_slide(db_url, data_dir):
    db = Database(db_url, data_dir=data_dir)
    now = [1_000.0]
    windows = SlidingWindows(db, clock=lambda: now[0])
    limit = WindowLimit("user:u2", 2, 60.0)
    try:
        windows.take([limit])
        now[0] += 30
        windows.take([limit])
        with pytest.raises(LimitReached) as refused:
            windows.take([limit])
        assert refused.value.wait_s == pytest.approx(30.0)
        now[0] += 31  # the first hit left the window
        windows.take([limit])
        assert windows.count("user:u2", 60.0) == 2
    finally:
        db.dispose()


def test_login_backoff_doubles_up_to_the_cap_and_is_shared(db_url, data_dir):
    now = [100.0]
    dbs = [Database(db_url, data_dir=data_dir) for _ in range(2)]
    try:
        one, two = (
            LoginThrottle(db, free=2, base_s=1.0, max_s=8.0, clock=lambda: now[0]) for db in dbs
        )
        one.fail("name:alice")
        assert two.wait_s("name:alice") == 0.0
        waits = []
        for i in range(5):
            (one, two)[i % 2].fail("name:alice")
            waits.append((two, one)[i % 2].wait_s("name:alice"))
            now[0] += waits[-1]  # the caller waits it out, then fails again
        assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]
        assert one.wait_s("name:bob") == 0.0
        two.succeed("name:alice")
        assert one.wait_s("name:alice") == 0.0
    finally:
        for db in dbs:
            db.dispose()


def test_sessions_are_hashed_shared_and_end_with_the_password(db_url, data_dir):
    dbs = [Database(db_url, data_dir=data_dir) for _ in range(2)]
    try:
        accounts = Accounts(dbs[0])
        accounts.create("alice", "alice-pass-1")
        here, there = SessionTokens(dbs[0], 720.0), SessionTokens(dbs[1], 720.0)
        token = "tok-" + "a" * 24
        here[token] = "alice"
        here["tok-nobody-xxxxxxxxxxxx"] = "nobody"  # no such user: no session
        assert there.get(token) == "alice" and token in there
        assert there.get("tok-nobody-xxxxxxxxxxxx") is None
        assert cookie_id(dbs[0]) == cookie_id(dbs[1])
        with dbs[1].session() as s:
            stored = list(s.scalars(select(WebSessionRow.token_hash)))
        assert len(stored) == 1 and token not in stored[0] and len(stored[0]) == 64

        accounts.change_password("alice", "alice-pass-2")
        assert there.get(token) is None
        with dbs[1].session() as s:
            assert s.scalar(select(WebSessionRow.token_hash)) is None

        expired = SessionTokens(dbs[1], 1e-9)
        expired[token] = "alice"
        assert expired.get(token) is None and here.get(token) is None
    finally:
        for db in dbs:
            db.dispose()


# ------------------------------------------------------------ two real app processes
WHO = ("alice", "alice-pass-1")
TARGET = ("bob", "bob-pass-123")


def _start_all(apps) -> None:
    with ThreadPoolExecutor(len(apps)) as pool:
        list(pool.map(lambda app: app.start(), apps))


def _cookie_client(app, cookies: httpx.Cookies) -> Client:
    header = "; ".join(f"{name}={value}" for name, value in cookies.items())
    return Client(app.base_url, headers={"Cookie": header}, verbose=False)


def _send(app, cookies: httpx.Cookies, text: str) -> str:
    client = _cookie_client(app, cookies)
    _, _, history, *_ = client.predict("", api_name="/load")
    _, _, status, _ = client.predict(text, history, "", api_name="/send")
    return status


@pytest.mark.slow
def test_two_replicas_share_sessions_throttle_and_limits_across_a_restart(
    db_url, tmp_path, tiny_model_dir
):
    env = {
        "UPC_AUTH__MODE": "password",
        "UPC_DATABASE_URL": db_url,
        "UPC_AUTH__LOGIN_FREE_FAILURES": "3",
        "UPC_AUTH__LOGIN_BACKOFF_S": "600",
        "UPC_LIMITS__MESSAGES_PER_MINUTE": "3",
    }
    a = tiny_app(tmp_path, tiny_model_dir, **env)
    b = tiny_app(tmp_path, tiny_model_dir, **env)
    for who in (WHO, TARGET):
        made = cli(a, "users", "add", who[0], "--password", who[1])
        assert made.returncode == 0, made.stderr
    _start_all([a, b])
    try:
        cookies = login(a, *WHO).cookies
        assert signed_in(a, cookies) and signed_in(b, cookies)
        assert not signed_in(b, httpx.Cookies({k: "forged-token" for k in cookies}))

        # Wrong passwords on one replica throttle the account on the other.
        assert [login(a, TARGET[0], f"wrong-{i}").status_code for i in range(3)] == [400] * 3
        assert login(b, *TARGET).status_code == 429

        # Three messages a minute, whichever replica takes them.
        assert [_send(r, cookies, f"hello {i}") for i, r in enumerate((b, a, b))] == [""] * 3
        assert "a minute" in _send(a, cookies, "one too many")

        a.restart()  # nobody is signed out, and nothing is forgotten
        assert signed_in(a, cookies)
        assert "a minute" in _send(a, cookies, "still too many")
        assert login(a, *TARGET).status_code == 429

        # Signing out on one replica ends the session on every replica.
        other = login(a, *WHO).cookies
        out = httpx.get(f"{b.base_url}/logout", cookies=other, follow_redirects=False)
        assert out.status_code == 302
        assert not signed_in(a, other) and not signed_in(a, cookies)  # all of alice's
    finally:
        b.stop()
        stop_and_clean(a, tmp_path)
