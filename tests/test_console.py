"""The operator console over real HTTP: admin-only handlers, live activation, file safety."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from tests.conftest import RunningApp, make_app

pytestmark = pytest.mark.slow

ADMIN = ("opsadmin", "admin-pass-123")
USER = ("plainuser", "user-pass-123")
ADAPTER_ID = "console-lora-1"
# Every console handler, by API name; a new handler must be added here (checked below).
CONSOLE_ENDPOINTS = {
    "console_refresh", "console_activate", "console_rollback", "console_retire",
    "console_compare", "console_replay", "console_ab_set", "console_ab_stats",
    "console_learner", "console_live", "console_tick", "console_pause", "console_resume",
    "console_run_now", "console_schedule", "console_plots", "console_loss",
    "console_conversations", "console_open", "console_exclude", "console_export",
}  # fmt: skip


def publish_random_lora(data_dir: Path, base_model_dir: Path, adapter_id: str) -> None:
    """A LoRA with random weights for the base model, published through the registry."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from learner.registry import AdapterManifest, AdapterRegistry
    from storage import Database

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    staging = data_dir.parent / f"staging-{adapter_id}"
    peft_model.save_pretrained(staging)
    db = Database(f"sqlite:///{data_dir / 'upc.db'}", data_dir=data_dir)
    try:
        registry = AdapterRegistry(data_dir / "adapters", db)
        registry.publish(
            staging,
            AdapterManifest(id=adapter_id, iteration=1, base_model_id=str(base_model_dir)),
        )
    finally:
        db.dispose()
    shutil.rmtree(staging)


def add_users(data_dir: Path) -> None:
    from chatbot.accounts import Accounts
    from storage import Database

    db = Database(f"sqlite:///{data_dir / 'upc.db'}", data_dir=data_dir)
    try:
        accounts = Accounts(db)
        accounts.create(*ADMIN, is_admin=True)
        accounts.create(*USER)
    finally:
        db.dispose()


def start_console_app(root: Path, model_dir: Path) -> RunningApp:
    """Password mode, two users (one admin), one published random LoRA, `model_dir` as chatbot."""
    data_dir = root / "upc-data"
    data_dir.mkdir(parents=True)
    add_users(data_dir)
    publish_random_lora(data_dir, model_dir, ADAPTER_ID)
    app = make_app(
        data_dir,
        root,
        UPC_AUTH__MODE="password",
        UPC_AUTH__ALLOW_SIGNUP="false",
        UPC_CHATBOT__MODEL=str(model_dir),
        UPC_MEMORY__ENABLED="false",
        UPC_GENERATION__MAX_NEW_TOKENS="8",
    )
    app.start()
    return app


@pytest.fixture(scope="module")
def console_app(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("console-app")
    app = start_console_app(root, tiny_model_dir)
    yield app
    app.stop()
    if os.environ.get("UPC_KEEP_TEST_LOGS") is None:
        shutil.rmtree(root, ignore_errors=True)


def _client(app: RunningApp, who: tuple[str, str]) -> Client:
    return Client(app.base_url, auth=who, verbose=False)


def _dummy(param: dict) -> object:
    if param.get("parameter_has_default"):
        return param.get("parameter_default")
    kind = (param.get("python_type") or {}).get("type", "")
    if "bool" in kind:
        return True
    if "float" in kind or "int" in kind:
        return 50
    return ADAPTER_ID


def test_every_console_handler_refuses_a_non_admin(console_app):
    client = _client(console_app, USER)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    found = {name.lstrip("/") for name in endpoints if name.startswith("/console_")}
    assert found == CONSOLE_ENDPOINTS
    for name in sorted(found):
        params = endpoints[f"/{name}"]["parameters"]
        args = [_dummy(p) for p in params]
        with pytest.raises(Exception, match="Operators only"):
            client.predict(*args, api_name=f"/{name}")
    # The refused activation changed nothing.
    assert httpx.get(f"{console_app.base_url}/healthz").json()["adapter"] == "base"


def test_admin_activates_live_with_confirmation_and_rolls_back(console_app):
    client = _client(console_app, ADMIN)
    table, *_, status = client.predict("", api_name="/console_refresh")
    ids = [row[0] for row in table["data"]]
    assert ids == ["base", ADAPTER_ID]
    assert "Serving:** `base`" in status
    _, note, _, _ = client.predict(ADAPTER_ID, False, "", api_name="/console_activate")
    assert "confirm" in note
    assert httpx.get(f"{console_app.base_url}/healthz").json()["adapter"] == "base"
    table, note, status, confirm = client.predict(
        ADAPTER_ID, True, "", api_name="/console_activate"
    )
    assert "hot-swap" in note and confirm is False
    assert "serving" in {row[0]: row[-1] for row in table["data"]}[ADAPTER_ID]
    assert httpx.get(f"{console_app.base_url}/healthz").json()["adapter"] == ADAPTER_ID
    assert (console_app.data_dir / "adapters" / "ACTIVE").read_text().strip() == ADAPTER_ID
    # A reply is now made with the adapter and logged with its id.
    chat = _client(console_app, ADMIN)
    _, _, history, *_ = chat.predict("", api_name="/load")
    chat.predict("Hello there, I keep bees.", history, "", api_name="/send")
    arms = client.predict("", api_name="/console_ab_stats")
    control = arms["data"][0]
    assert control[0] == "control" and control[1] == ADAPTER_ID and control[2] >= 1
    _, note, _, _ = client.predict(True, "", api_name="/console_rollback")
    assert "`base`" in note
    assert httpx.get(f"{console_app.base_url}/healthz").json()["adapter"] == "base"


def test_admin_compare_plots_dialogues_and_exclusion(console_app):
    client = _client(console_app, ADMIN)
    left, right = client.predict(
        "I restore old motorbikes.", "A mechanic who restores motorbikes.", "base", ADAPTER_ID,
        "", api_name="/console_compare",
    )  # fmt: skip
    assert "`base`" in left and f"`{ADAPTER_ID}`" in right
    assert "rel **" in left and "Mean:" in right
    plots = client.predict("", api_name="/console_plots")
    assert len(plots) == 3 and all(p is not None for p in plots)
    conversations, _ = client.predict("", "", api_name="/console_conversations")
    assert conversations["data"], "the admin's chat above is logged"
    cid = conversations["data"][0][0]
    title, turns, _, excluded = client.predict(cid, "", api_name="/console_open")
    assert ADMIN[0] in title and excluded is False
    bot_turns = [row for row in turns["data"] if row[1] == "assistant" and row[0] > 0]
    assert bot_turns and all(row[6] != "" for row in bot_turns), "critic scores per bot turn"
    note = client.predict(USER[0], True, "", api_name="/console_exclude")
    assert "excluded" in note
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{console_app.data_dir / 'upc.db'}")
    with engine.connect() as conn:
        flag = conn.execute(
            text("SELECT excluded_from_training FROM users WHERE username = :u"), {"u": USER[0]}
        ).scalar()
    engine.dispose()
    assert flag == 1


def test_ab_split_is_persisted_and_validated(console_app):
    client = _client(console_app, ADMIN)
    note, _, _ = client.predict(ADAPTER_ID, 50, False, "", api_name="/console_ab_set")
    assert "confirm" in note and not (console_app.data_dir / "adapters" / "AB_SPLIT.json").exists()
    note, status, _ = client.predict(ADAPTER_ID, 50, True, "", api_name="/console_ab_set")
    assert "50%" in note and ADAPTER_ID in status
    saved = (console_app.data_dir / "adapters" / "AB_SPLIT.json").read_text()
    assert ADAPTER_ID in saved and "0.5" in saved
    arms = client.predict("", api_name="/console_ab_stats")
    assert [row[0] for row in arms["data"]] == ["control", "candidate"]
    with pytest.raises(Exception, match=r"retire|candidate"):
        client.predict(ADAPTER_ID, True, "", api_name="/console_retire")
    note, _, _ = client.predict(ADAPTER_ID, 0, True, "", api_name="/console_ab_set")
    assert "off" in note


def _login_cookies(app: RunningApp, who: tuple[str, str]) -> httpx.Cookies:
    r = httpx.post(f"{app.base_url}/login", data={"username": who[0], "password": who[1]})
    assert r.status_code == 200, r.text
    return r.cookies


def test_file_routes_never_serve_private_files(console_app):
    cookies = _login_cookies(console_app, ADMIN)
    data = console_app.data_dir.resolve()
    targets = [
        data / "upc.db",
        data / "upc.db-wal",
        data / "chroma" / "chroma.sqlite3",
        data / "adapters" / ADAPTER_ID / "adapter_model.safetensors",
        data / "adapters" / ADAPTER_ID / "manifest.json",
        data / "session.key",
        Path("/proc/self/environ"),
        Path("/etc/passwd"),
    ]
    secret = console_app.api_key.encode()
    for target in targets:
        variants = [
            f"/gradio_api/file={target}",
            f"/gradio_api/file=/tmp/gradio/../..{target}",
            f"/gradio_api/file={os.path.relpath(target, Path.cwd())}",
            f"/file={target}",
            f"/gradio_api/file=..%2F..%2F..%2F..{target}",
        ]
        for path in variants:
            r = httpx.get(console_app.base_url + path, cookies=cookies)
            assert r.status_code in (400, 403, 404), (path, r.status_code)
            assert secret not in r.content and b"SQLite format" not in r.content


def test_foreign_and_null_origins_are_refused(console_app):
    cookies = _login_cookies(console_app, ADMIN)
    body = {"data": [ADAPTER_ID, True, ""], "fn_index": 0, "session_hash": "x" * 10}
    for origin in ("null", "https://evil.example"):
        r = httpx.post(
            f"{console_app.base_url}/gradio_api/queue/join",
            json=body,
            headers={"Origin": origin},
            cookies=cookies,
        )
        assert r.status_code == 403
    assert httpx.get(f"{console_app.base_url}/healthz").json()["adapter"] == "base"


def test_admin_export_is_downloaded_through_the_authenticated_route_only(console_app):
    import json
    import re

    client = _client(console_app, ADMIN)
    with pytest.raises(Exception, match="date"):
        client.predict("jsonl", "all", True, "not-a-date", "", "", "", None, None, "any", "",
                       api_name="/console_export")  # fmt: skip
    note, link = client.predict(
        "jsonl", "real", True, "", "", "", "", None, None, "any", "", api_name="/console_export"
    )
    assert "PII scrubbing on" in note and "Exported" in note
    href = re.search(r'href="([^"]+)"', link).group(1)
    cookies = _login_cookies(console_app, ADMIN)
    r = httpx.get(console_app.base_url + href, cookies=cookies)
    assert r.status_code == 200
    lines = r.text.splitlines()
    assert lines and all(json.loads(line)["messages"] for line in lines)
    assert httpx.get(console_app.base_url + href, cookies=cookies).status_code == 404  # used up
    # The export itself stays in the blocked data dir; Gradio's file route never serves it.
    exported = list((console_app.data_dir / "exports").glob("*/dialogues.jsonl"))
    assert exported
    r = httpx.get(
        f"{console_app.base_url}/gradio_api/file={exported[0].resolve()}", cookies=cookies
    )
    assert r.status_code in (400, 403, 404)
