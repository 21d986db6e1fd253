"""Generated hostile input for the running app, and the checks each answer must pass.

Shared by `tests/security/test_fuzz.py` (a few hundred cases) and `bench/chaos/fuzz.py`
(thousands). Targets: the chat's `send` and `preferences` events through Gradio's HTTP
API, `/v1/chat/completions`, `upc personas import`, `upc adapters import`, and settings
from the environment (`upc settings`). A case passes when the server answers below 500,
no answer carries internals (a traceback, a file path of the code, SQL), refusals say
something, and nothing is half-stored (a send stores both turns or neither).
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import RunningApp

__all__ = [
    "Outcome",
    "Tally",
    "adapter_dirs",
    "persona_files",
    "run_cli",
    "run_prefs",
    "run_send",
    "run_v1",
    "send_cases",
    "settings_envs",
    "text_case",
    "v1_bodies",
]

# Internals in an answer: a traceback, a path of the code, SQL or a database error.
# (Upper-case SQL only: the tiny random model's replies are full of stray English words.)
_INTERNALS = re.compile(
    r"Traceback \(most recent|File \"/[^\"]+\.py\"|sqlalchemy\.|sqlite3\.\w*Error"
    r"|\bINSERT INTO\b|\bSELECT\b[^\n]{0,200}\bFROM\b"
)
_FORMAT_CHARS = "\u200b\u200c\u200d\u2060\ufeff\u202e\u202d\u2066\u2067\u2069\u00ad\U000e0041"
_WRONG = (None, 123, -1.5, True, [], {}, ["a"], {"text": "x"}, "x" * 3)


@dataclass
class Outcome:
    target: str
    case: str
    status: int
    verdict: str  # accepted | refused | refused-silently | server-error | leak | half-stored
    detail: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for o in self.outcomes:
            by = out.setdefault(o.target, {})
            by[o.verdict] = by.get(o.verdict, 0) + 1
        return out

    def failures(self) -> list[Outcome]:
        bad = ("server-error", "leak", "half-stored")
        return [o for o in self.outcomes if o.verdict in bad]


# ----------------------------------------------------------------------------- cases


def text_case(rng: random.Random) -> tuple[str, str]:
    """(kind, text): one generated chat message."""
    kind = rng.choice(
        ("empty", "blank", "huge", "binary", "control", "format", "unicode", "markup", "plain")
    )
    if kind == "empty":
        return kind, ""
    if kind == "blank":
        return kind, rng.choice((" ", "\n\t ", "\u3000\u00a0", "\u200b" * 5))
    if kind == "huge":
        return kind, rng.choice("ab ") * rng.choice((4001, 20_000, 300_000))
    if kind == "binary":
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        return kind, raw.decode("latin-1")
    if kind == "control":
        return kind, "".join(
            chr(rng.choice([*range(32), 127])) for _ in range(rng.randrange(1, 50))
        )
    if kind == "format":
        return kind, "hi " + "".join(rng.choice(_FORMAT_CHARS) for _ in range(rng.randrange(1, 40)))
    if kind == "unicode":
        zalgo = "e" + "".join(chr(rng.randrange(0x300, 0x36F)) for _ in range(60))
        return kind, rng.choice(("🙂" * 300, "漢字かな交じり文", zalgo, "\U0010ffff\ufffe"))
    if kind == "markup":
        return kind, rng.choice(
            (
                "<script>alert(1)</script>",
                "'; DROP TABLE messages; --",
                "{{7*7}} ${7*7}",
                "../../etc/passwd %00",
                "<img src=x onerror=alert(1)>",
                "\\x00\\u0000",
            )
        )
    return kind, rng.choice(("hello", "how are you?", "tell me a joke"))


def send_cases(rng: random.Random, n: int, bid: str) -> list[tuple[str, Any]]:
    """(label, request JSON) for Gradio's `send`: [text, history, browser id] or worse."""
    cases: list[tuple[str, Any]] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.6:
            kind, text = text_case(rng)
            cases.append((f"text:{kind}", {"data": [text, [], bid]}))
        elif roll < 0.75:
            wrong = rng.choice(_WRONG)
            slot = rng.randrange(3)
            data: list[Any] = ["hello", [], bid]
            data[slot] = wrong
            cases.append((f"wrong-type:slot{slot}:{type(wrong).__name__}", {"data": data}))
        elif roll < 0.85:
            history = rng.choice(
                ("x", 5, [1, 2], [{"role": "bad", "content": "x"}], [{"content": None}], [[]])
            )
            cases.append(("bad-history", {"data": ["hello", history, bid]}))
        else:
            cases.append(
                (
                    "bad-shape",
                    rng.choice(
                        ({"data": []}, {"data": ["x"]}, {"data": ["x"] * 12}, {"dat": 1}, [], None)
                    ),
                )
            )
    return cases


def v1_bodies(rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """(label, raw body) for `/v1/chat/completions`."""
    fixed = (
        ("empty", b""),
        ("broken-json", b'{"messages": [{"role": "user", "content": "hi"'),
        ("not-utf8", b"\xff\xfe\x00{"),
        ("null", b"null"),
        ("list", b"[]"),
        ("deep", b"[" * 50_000 + b"]" * 50_000),
        ("huge", json.dumps({"messages": [{"role": "user", "content": "a" * 3_000_000}]}).encode()),
        ("nan", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    )
    out: list[tuple[str, bytes]] = []
    for _ in range(n):
        if rng.random() < 0.2:
            out.append(rng.choice(fixed))
            continue
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        field_name = rng.choice(
            ("messages", "role", "content", "max_tokens", "temperature", "stream", "model", "stop")
        )
        value: Any = rng.choice(_WRONG)
        if field_name == "messages":
            body["messages"] = rng.choice(
                (value, [value], [{"role": "user"}] * rng.randrange(1, 100), [{}] * 3)
            )
        elif field_name == "role":
            body["messages"] = [{"role": rng.choice((value, "tool", "root", "")), "content": "x"}]
        elif field_name == "content":
            _, text = text_case(rng)
            body["messages"] = [{"role": "user", "content": rng.choice((value, text))}]
        elif field_name == "max_tokens":
            body["max_tokens"] = rng.choice((value, -1, 0, 10**12, "10"))
        elif field_name == "temperature":
            body["temperature"] = rng.choice((value, -1, 1e308, "hot"))
        elif field_name == "stream":
            body["stream"] = rng.choice((value, "yes", 1))
        elif field_name == "model":
            body["model"] = rng.choice((value, "../../etc/passwd", "no-such-model"))
        else:
            body["stop"] = rng.choice((value, ["x"] * 1000, [None]))
        out.append((f"field:{field_name}", json.dumps(body).encode()))
    return out


def persona_files(rng: random.Random, n: int, root: Path) -> list[tuple[str, Path]]:
    """(label, path) of hostile background files for `upc personas import`."""
    contents: tuple[tuple[str, str, bytes], ...] = (
        ("empty", "json", b""),
        ("broken-json", "json", b'[{"id": "a", "background": "x"'),
        ("not-a-list", "json", b'{"id": 5}'),
        ("wrong-types", "json", b'[{"id": 5, "background": ["x"], "split": 7}]'),
        ("binary", "csv", bytes(range(256)) * 20),
        ("bad-jsonl", "jsonl", b'{"background": "ok"}\n{not json}\n'),
        ("huge-field", "jsonl", json.dumps({"background": "x" * 2_000_000}).encode() + b"\n"),
        ("control", "csv", b"id,background\n\x00\x01,\x1b[31m\n"),
        ("wrong-suffix", "txt", b"hello"),
    )
    out = []
    for i in range(n):
        label, suffix, data = contents[rng.randrange(len(contents))]
        path = root / f"persona-{i}-{label}.{suffix}"
        path.write_bytes(data)
        out.append((label, path))
    return out


def adapter_dirs(rng: random.Random, n: int, root: Path) -> list[tuple[str, Path]]:
    """(label, dir) of hostile adapter directories for `upc adapters import`."""
    cases: tuple[tuple[str, dict[str, bytes]], ...] = (
        ("empty-dir", {}),
        ("broken-config", {"adapter_config.json": b"{", "adapter_model.safetensors": b"\0" * 16}),
        ("config-wrong-types", {"adapter_config.json": b'{"r": "big", "target_modules": 5}'}),
        (
            "binary-weights",
            {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\xff" * 64},
        ),
        (
            "huge-header-len",
            {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\xff" * 8},
        ),
        ("stray-file", {"adapter_config.json": b"{}", "payload": b"\x80\x04K\x01."}),
    )
    out = []
    for i in range(n):
        label, files = cases[rng.randrange(len(cases))]
        folder = root / f"adapter-{i}-{label}"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        out.append((label, folder))
    return out


def settings_envs(rng: random.Random, n: int) -> list[tuple[str, dict[str, str]]]:
    """(label, env overrides) that `upc settings` must refuse or accept cleanly."""
    keys = (
        "UPC_LIMITS__CONTEXT_TOKENS",
        "UPC_LIMITS__MAX_MESSAGE_CHARS",
        "UPC_SERVER__PORT",
        "UPC_AUTH__MODE",
        "UPC_GENERATION__TEMPERATURE",
        "UPC_MEMORY__ENABLED",
    )
    values = ("abc", "-5", "1e999", "", " ", "0x10", "[1,2]", "true", "🙂", "9" * 400)
    return [
        (f"{k}={v[:10]!r}", {k: v})
        for k, v in ((rng.choice(keys), rng.choice(values)) for _ in range(n))
    ]


# ----------------------------------------------------------------------------- runners


def _leaks(text: str) -> bool:
    return bool(_INTERNALS.search(text))


def _message_count(db_path: Path) -> tuple[int, int]:
    """(all messages, messages whose role is user)."""
    con = sqlite3.connect(db_path, timeout=30)
    try:
        total = con.execute("SELECT count(*) FROM messages").fetchone()[0]
        users = con.execute("SELECT count(*) FROM messages WHERE role = 'user'").fetchone()[0]
        return total, users
    finally:
        con.close()


def _gradio_call(client: httpx.Client, api: str, payload: Any) -> tuple[int, str, str]:
    """(POST status, final SSE event name, its data) of one Gradio API call."""
    r = client.post(f"/gradio_api/call/{api}", json=payload)
    if r.status_code != 200:
        return r.status_code, "", r.text
    event_id = r.json()["event_id"]
    stream = client.get(f"/gradio_api/call/{api}/{event_id}")
    events = re.findall(r"event: (\w+)\ndata: (.*)", stream.text)
    if stream.status_code != 200 or not events:
        return stream.status_code, "", stream.text
    name, data = events[-1]
    return 200, name, data


def run_send(app: RunningApp, client: httpx.Client, label: str, payload: Any) -> Outcome:
    db_path = app.data_dir / "upc.db"
    before = _message_count(db_path)
    status, event, data = _gradio_call(client, "send", payload)
    after = _message_count(db_path)
    added, added_user = after[0] - before[0], after[1] - before[1]
    if status >= 500:
        return Outcome("send", label, status, "server-error", data[:200])
    if not added and _leaks(data):  # (a reply is the model's text, not ours to judge)
        return Outcome("send", label, status, "leak", data[:200])
    if (added, added_user) not in ((0, 0), (2, 1)):
        return Outcome("send", label, status, "half-stored", f"+{added} rows")
    if added:
        return Outcome("send", label, status, "accepted")
    warned = "⚠" in data or "\\u26a0" in data  # the status line's warning, maybe escaped
    said = (event == "complete" and warned) or (event == "error" and "null" not in data)
    said = said or '"detail"' in data  # FastAPI's own 4xx answer names the problem
    return Outcome("send", label, status, "refused" if said else "refused-silently", data[:120])


def run_prefs(client: httpx.Client, label: str, payload: Any) -> Outcome:
    status, event, data = _gradio_call(client, "preferences", payload)
    if status >= 500:
        return Outcome("preferences", label, status, "server-error", data[:200])
    if _leaks(data):
        return Outcome("preferences", label, status, "leak", data[:200])
    if event == "complete":
        return Outcome("preferences", label, status, "accepted", data[:80])
    said = (event == "error" and "null" not in data) or '"detail"' in data
    return Outcome("preferences", label, status, "refused" if said else "refused-silently")


def run_v1(app: RunningApp, client: httpx.Client, label: str, body: bytes) -> Outcome:
    headers = {"Authorization": f"Bearer {app.api_key}", "Content-Type": "application/json"}
    r = client.post("/v1/chat/completions", content=body, headers=headers)
    text = r.text
    if r.status_code >= 500 and r.status_code not in (503,):
        return Outcome("v1", label, r.status_code, "server-error", text[:200])
    if r.status_code == 200:  # a completion: the model's text
        return Outcome("v1", label, 200, "accepted")
    if _leaks(text):
        return Outcome("v1", label, r.status_code, "leak", text[:200])
    try:
        answer = json.loads(text)
        message = answer["error"]["message"] if "error" in answer else answer["detail"]
    except (ValueError, KeyError, TypeError):
        message = ""
    return Outcome(
        "v1", label, r.status_code, "refused" if message else "refused-silently", text[:120]
    )


def run_cli(
    target: str,
    label: str,
    run: Callable[[], Any],
    unchanged: Callable[[], bool],
) -> Outcome:
    """A CLI case: must fail with a one-line error (no traceback) and change nothing."""
    done = run()
    output = done.stdout + done.stderr
    if "Traceback" in output:
        return Outcome(target, label, done.returncode, "server-error", output[-300:])
    if done.returncode == 0:
        return Outcome(target, label, 0, "accepted", output[-120:])
    if not unchanged():
        return Outcome(target, label, done.returncode, "half-stored", output[-200:])
    said = "error" in output.lower()
    return Outcome(target, label, done.returncode, "refused" if said else "refused-silently")


def tree_snapshot(root: Path, skip: tuple[str, ...] = ("upc.db", "session.key")) -> dict:
    """Every file under `root` (but the database and keys) with its size, to spot writes."""
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(skip)
    }


@dataclass(frozen=True)
class FuzzPlan:
    send: int
    v1: int
    persona_files: int
    adapter_dirs: int
    settings: int


def fuzz_app_env() -> dict[str, str]:
    """Anonymous mode with the per-minute limits out of the way (not what is tested)."""
    return {
        "UPC_AUTH__MODE": "anonymous",
        "UPC_LIMITS__MESSAGES_PER_MINUTE": "1000000",
        "UPC_LIMITS__ADDRESS_MESSAGES_PER_MINUTE": "1000000",
    }


def run_suite(
    app: RunningApp,
    rng: random.Random,
    plan: FuzzPlan,
    files: Path,
    cli: Callable[..., Any],
    browser_id: str,
) -> Tally:
    """Every target of the module doc, as many cases as `plan` says, against a started app."""
    tally = Tally()
    with httpx.Client(base_url=app.base_url, timeout=120) as http:
        for label, payload in send_cases(rng, plan.send, browser_id):
            tally.add(run_send(app, http, label, payload))
        for label, body in v1_bodies(rng, plan.v1):
            tally.add(run_v1(app, http, label, body))
        for value in (True, False, "yes", None, 5, [], {"a": 1}):
            tally.add(run_prefs(http, f"learning={value!r}", {"data": [value, True, browser_id]}))
    before = tree_snapshot(app.data_dir)

    def unchanged() -> bool:
        return tree_snapshot(app.data_dir) == before

    for label, path in persona_files(rng, plan.persona_files, files):
        run = lambda p=path: cli(app, "personas", "import", str(p))  # noqa: E731
        tally.add(run_cli("persona-import", label, run, unchanged))
    for label, folder in adapter_dirs(rng, plan.adapter_dirs, files):
        run = lambda f=folder: cli(app, "adapters", "import", str(f))  # noqa: E731
        tally.add(run_cli("adapter-import", label, run, unchanged))
    for label, env in settings_envs(rng, plan.settings):
        run = lambda e=env: cli(app, "settings", env=e)  # noqa: E731
        tally.add(run_cli("settings", label, run, lambda: True))
    return tally


def silent_refusals(tally: Tally) -> list[Outcome]:
    """Refusals with no message, of requests that reached our own code (Gradio answers a
    call whose values don't fit its components with a bare error, before our handlers)."""
    ours = ("text:", "field:", "empty", "broken-json", "not-utf8", "null", "list", "deep", "huge")
    return [
        o for o in tally.outcomes if o.verdict == "refused-silently" and o.case.startswith(ours)
    ]
