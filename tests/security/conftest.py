"""Apps for the attack suite: the real server on localhost, a tiny model, real SQLite.

`password_app` and `anon_app` are shared by the whole security suite; a test that changes
server-wide state (the active adapter, the sign-in throttle) starts its own app.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from tests.conftest import REPO, RunningApp, make_app

ADMIN = ("boss", "boss-pass-123")
USER = ("plainuser", "user-pass-123")
RESERVED_ADMIN = "root"  # listed in UPC_AUTH__ADMIN_USERS, no account
ADMIN_SECRET = "operator-secret-" + "5" * 16
CONTEXT_TOKENS = 512  # anon_app's context window: small, so long prompts are quick to make


def cli(
    app: RunningApp, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `upc ARGS` against the app's data dir, as an operator would (`env` on top)."""
    return subprocess.run(
        [sys.executable, "-m", "chatbot.cli", *args],
        cwd=REPO,
        env={**app.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
    )


def login(app: RunningApp, name: str, password: str) -> httpx.Response:
    return httpx.post(
        f"{app.base_url}/login", data={"username": name, "password": password}, timeout=60
    )


def signed_in(app: RunningApp, cookies: httpx.Cookies) -> bool:
    """Does the server still accept this session cookie?"""
    r = httpx.get(f"{app.base_url}/gradio_api/login_check", cookies=cookies, timeout=30)
    return r.status_code == 200


def client(app: RunningApp, who: tuple[str, str] | None = None) -> Client:
    return Client(app.base_url, auth=who, verbose=False)


def tiny_app(root: Path, model_dir: Path, **env: str) -> RunningApp:
    """An app on the tiny random model, memory off (fast) unless `env` says so, not started."""
    data_dir = root / "upc-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    defaults = {"UPC_MEMORY__ENABLED": "false", "UPC_GENERATION__MAX_NEW_TOKENS": "8"}
    return make_app(data_dir, root, UPC_CHATBOT__MODEL=str(model_dir), **{**defaults, **env})


def stop_and_clean(app: RunningApp, root: Path) -> None:
    app.stop()
    if os.environ.get("UPC_KEEP_TEST_LOGS") is None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def password_app(tmp_path_factory, tiny_model_dir):
    """Password mode; `boss` is an admin made by the CLI, `root` a listed admin name with no
    account. The sign-in throttle is relaxed: every test here signs in from 127.0.0.1."""
    root = tmp_path_factory.mktemp("sec-password")
    app = tiny_app(
        root,
        tiny_model_dir,
        UPC_AUTH__MODE="password",
        UPC_AUTH__ADMIN_USERS=RESERVED_ADMIN,
        UPC_AUTH__LOGIN_IP_FREE_FAILURES="100000",
        UPC_AUTH__LOGIN_FREE_FAILURES="100000",
    )
    made = cli(app, "users", "add", ADMIN[0], "--password", ADMIN[1], "--admin")
    assert made.returncode == 0, made.stderr
    made = cli(app, "users", "add", USER[0], "--password", USER[1])
    assert made.returncode == 0, made.stderr
    app.start()
    yield app
    stop_and_clean(app, root)


@pytest.fixture(scope="session")
def anon_app(tmp_path_factory, tiny_model_dir):
    """Anonymous (demo-style) mode with an operator secret, so the console exists, and a
    small context window."""
    root = tmp_path_factory.mktemp("sec-anon")
    app = tiny_app(
        root,
        tiny_model_dir,
        UPC_AUTH__MODE="anonymous",
        UPC_ADMIN_SECRET=ADMIN_SECRET,
        UPC_LIMITS__CONTEXT_TOKENS=str(CONTEXT_TOKENS),
    )
    app.start()
    yield app
    stop_and_clean(app, root)
