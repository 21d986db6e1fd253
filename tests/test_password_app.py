"""Password sign-in, per-user isolation through the UI handlers, and a restart."""

import subprocess
import sys

import httpx
import pytest
from gradio_client import Client

from tests.conftest import REPO, make_app

pytestmark = pytest.mark.slow


def text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


@pytest.fixture(scope="module")
def password_app(tmp_path_factory, embedded_model_dir):
    import os

    root = tmp_path_factory.mktemp("password-app")
    data_dir = root / "upc-data"
    (data_dir / "models").mkdir(parents=True)
    os.symlink(embedded_model_dir, data_dir / "models" / embedded_model_dir.name)
    app = make_app(data_dir, root, UPC_AUTH__MODE="password", UPC_AUTH__ADMIN_USERS="olga")
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatbot.cli",
            "users",
            "add",
            "alice",
            "--password",
            "alice-pass-1",
        ],
        cwd=REPO,
        env=app.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    app.start()
    yield app
    app.stop()


def test_sign_in_is_required_and_checked(password_app):
    config = httpx.get(password_app.base_url + "/config")
    assert config.status_code == 401 or config.json().get("auth_required") is True
    with pytest.raises(ValueError, match="Could not login"):
        Client(password_app.base_url, auth=("alice", "wrong-password"), verbose=False)
    with pytest.raises(Exception, match=r"(?i)login|auth|401|403|sign in"):
        Client(password_app.base_url, verbose=False).predict("", api_name="/load")


def test_users_are_isolated_and_history_survives_restart(password_app):
    alice = Client(password_app.base_url, auth=("alice", "alice-pass-1"), verbose=False)
    _, conv_a, history, *_ = alice.predict("", api_name="/load")
    assert history and history[0]["role"] == "assistant"
    _, history, status, _ = alice.predict(
        "alice-canary-991 is my cat", history, "", api_name="/send"
    )
    assert status == "" and len(history) == 3
    # A new name registers at first sign-in; bob sees none of alice's conversations.
    bob = Client(password_app.base_url, auth=("bob", "bob-pass-12"), verbose=False)
    _, conv_b, bob_history, *_ = bob.predict("", api_name="/load")
    assert all(c[1] != conv_a["value"] for c in conv_b["choices"])
    assert not any("alice-canary" in text_of(m) for m in bob_history)
    with pytest.raises(Exception, match=r"does not exist|not in the list of choices"):
        bob.predict(conv_a["value"], "", api_name="/open_conversation")
    password_app.restart()
    again = Client(password_app.base_url, auth=("alice", "alice-pass-1"), verbose=False)
    _, conv_again, history_again, *_ = again.predict("", api_name="/load")
    assert conv_again["value"] == conv_a["value"]
    assert any("alice-canary-991" in text_of(m) for m in history_again)
    assert len(history_again) == 3
    bob_again = Client(password_app.base_url, auth=("bob", "bob-pass-12"), verbose=False)
    assert bob_again.predict("", api_name="/load")[1]["choices"]


def test_corrupt_data_dir_refuses_to_start(tmp_path):
    data_dir = tmp_path / "upc-data"
    data_dir.mkdir()
    (data_dir / "upc.db").write_bytes(b"garbage" * 1000)
    app = make_app(data_dir, tmp_path)
    result = subprocess.run(
        [sys.executable, str(REPO / "app.py")],
        cwd=REPO,
        env=app.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3
    assert "not a SQLite database" in result.stderr
    assert (data_dir / "upc.db").read_bytes() == b"garbage" * 1000
