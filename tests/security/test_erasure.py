"""Probe 16 of issue 16: `upc erase` reaches every copy of a user's words.

A user puts a canary in their chats and memory; the operator exports (scrubbed and not)
and downloads through the console, leaving one link unused; then `upc erase` runs while
the app is up. The raw bytes of every file in the data dir and in the app's temp dirs
hold neither the canary nor the user's id: SQLite (with its -wal), Chroma's own log,
the exports, the console's download copies. A bystander's export and memory survive.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.security.conftest import ADMIN, cli, client, login, stop_and_clean, tiny_app

pytestmark = pytest.mark.slow

CANARY = "qzcanary"
VICTIM = ("victim", "victim-pass-123")
BYSTANDER = ("bystander", "bystander-pass-123")


def _chat(app, who, lines) -> None:
    chat = client(app, who)
    _, _, history, *_ = chat.predict("", api_name="/load")
    for line in lines:
        _, history, status, _ = chat.predict(line, history, "", api_name="/send")
        assert status == "", status


def _export(app, admin, *, scrub: bool, users: str = "") -> str:
    form = ("jsonl", "all", scrub, "", "", users, "", None, None, "any")
    _, link = admin.predict(*form, "", api_name="/console_export")
    return app.base_url + re.search(r'href="([^"]+)"', link).group(1)


def _hits(roots: list[Path], needles: list[bytes]) -> dict[str, int]:
    """Every file under `roots` whose raw bytes hold a needle (case-insensitive)."""
    found = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes().lower()
                count = sum(data.count(n.lower()) for n in needles)
                if count:
                    found[str(path.relative_to(root.parent))] = count
    return found


def _user_id(db_path: Path, name: str) -> str:
    con = sqlite3.connect(db_path)
    try:
        return con.execute("SELECT id FROM users WHERE username = ?", (name,)).fetchone()[0]
    finally:
        con.close()


def _facts(db_path: Path, user_id: str) -> list[str]:
    con = sqlite3.connect(db_path)
    try:
        rows = con.execute("SELECT text FROM memory_facts WHERE user_id = ?", (user_id,))
        return [r[0] for r in rows]
    finally:
        con.close()


def test_probe16_erase_leaves_no_copy_in_the_data_dir_or_temp_dirs(tmp_path, tiny_model_dir):
    tmp = tmp_path / "tmp"
    (tmp / "gradio").mkdir(parents=True)
    app = tiny_app(
        tmp_path,
        tiny_model_dir,
        UPC_AUTH__MODE="password",
        UPC_MEMORY__ENABLED="true",
        UPC_AUTH__LOGIN_IP_FREE_FAILURES="100000",
        TMPDIR=str(tmp),
        GRADIO_TEMP_DIR=str(tmp / "gradio"),
    )
    for name, password, *admin in ((*ADMIN, "--admin"), VICTIM, BYSTANDER):
        made = cli(app, "users", "add", name, "--password", password, *admin)
        assert made.returncode == 0, made.stderr
    app.start()
    db_path = app.data_dir / "upc.db"
    try:
        # The first line becomes a memory fact (which scrubbing replaces); the second stays
        # in every export, scrubbed or not.
        _chat(app, VICTIM, (f"I live in {CANARY.title()}burg", f"a joke about {CANARY} rockets"))
        _chat(app, BYSTANDER, ("I live in Lisbon",))
        victim_id = _user_id(db_path, VICTIM[0])
        bystander_id = _user_id(db_path, BYSTANDER[0])
        assert any(CANARY in f.lower() for f in _facts(db_path, victim_id))

        admin = client(app, ADMIN)
        cookies = login(app, *ADMIN).cookies
        downloaded = _export(app, admin, scrub=True)
        assert CANARY in httpx.get(downloaded, cookies=cookies).text.lower()
        unused = _export(app, admin, scrub=False)  # its copy waits in the downloads dir
        _export(app, admin, scrub=False, users=BYSTANDER[0])
        roots = [app.data_dir, tmp]
        needles = [CANARY.encode(), victim_id.encode()]
        before = _hits(roots, needles)
        assert any("exports" in p for p in before) and any("console-downloads" in p for p in before)
        assert any("chroma" in p for p in before), before  # the user id in Chroma's log

        erased = cli(app, "erase", VICTIM[0], "--yes")
        assert erased.returncode == 0, erased.stderr
        report = json.loads(erased.stdout)
        assert len(report["exports_deleted"]) == 2 and report["chroma_rebuilt"] is True
        assert report["download_copies_deleted"] >= 1

        assert _hits(roots, needles) == {}  # every file, upc.db-wal and Chroma's included
        # What is not the victim's is kept, and the app goes on.
        assert len(list((app.data_dir / "exports").iterdir())) == 1
        assert _facts(db_path, bystander_id)
        assert httpx.get(unused, cookies=cookies).status_code == 404
        time.sleep(1.0)
        _chat(app, BYSTANDER, ("I work as a baker",))
        assert len(_facts(db_path, bystander_id)) >= 2
    finally:
        stop_and_clean(app, tmp_path)
