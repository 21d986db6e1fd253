"""Cross-user probes with canaries, and the console called directly by everyone who must be
refused: shared by `tests/security/test_probes.py` (a few hundred requests) and
`bench/chaos/probes.py` (10,000).

The app runs in password mode on the tiny model. Each user chats through the real `send`
(so their canaries are real rows), the admin makes an export link, and then random
attackers (each signed-in user, and nobody) aim random requests at everything: Gradio's API
with the victims' conversation and message ids, `/v1`, the download route, Gradio's file
route at the data dir, every console handler, the config and info routes. A request leaks
when its answer holds a canary of anyone but the caller. The console part calls each
handler as nobody, as a user, and as the admin from a foreign origin and host: each must
be refused (and, as the admin from our own origin, must work: the calls are well formed).
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.conftest import RunningApp

__all__ = [
    "ADMIN",
    "USERS",
    "Actor",
    "ProbeReport",
    "console_matrix",
    "export_link",
    "gradio_call",
    "probe",
    "probe_app_env",
    "seed_users",
    "summarise_matrix",
]

ADMIN = ("chief", "chief-pass-123")
USERS = [(f"user{n}", f"user{n}-pass-123") for n in range(4)]
ADMIN_ONLY = "Operators only"
FOREIGN = "evil.example"


@dataclass
class Actor:
    """A caller: a signed-in user (cookies) or nobody, with the canaries that are theirs."""

    name: str
    client: httpx.Client
    canaries: set[str] = field(default_factory=set)
    conversations: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    is_admin: bool = False


@dataclass
class ProbeReport:
    requests: int = 0
    leaks: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    by_kind: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)


def gradio_call(
    client: httpx.Client, api: str, data: list[Any], headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """(status, last SSE event, raw answer) of one call through Gradio's HTTP API."""
    r = client.post(f"/gradio_api/call/{api}", json={"data": data}, headers=headers or {})
    if r.status_code != 200:
        return r.status_code, "", r.text
    event_id = r.json()["event_id"]
    answer = client.get(f"/gradio_api/call/{api}/{event_id}", headers=headers or {})
    events = re.findall(r"event: (\w+)\ndata: (.*)", answer.text)
    return answer.status_code, events[-1][0] if events else "", answer.text


def _signed_in(app: RunningApp, name: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=app.base_url, timeout=60)
    r = client.post("/login", data={"username": name, "password": password})
    assert r.status_code == 200, r.text
    return client


def seed_users(
    app: RunningApp, users: list[tuple[str, str]], rng: random.Random, chats: int = 2
) -> list[Actor]:
    """Sign each user in and have them chat `chats` canary messages, each in its own
    conversation; their ids are then read from the database (an attacker may know them)."""
    actors = []
    for name, password in users:
        actor = Actor(name, _signed_in(app, name, password))
        for _ in range(chats):
            canary = "CANARY" + "".join(rng.choice(string.ascii_uppercase) for _ in range(16))
            actor.canaries.add(canary)
            gradio_call(actor.client, "new_conversation", [""])
            _, event, raw = gradio_call(actor.client, "send", [f"my secret is {canary}", [], ""])
            assert event == "complete" and canary in raw, raw[-500:]
        actors.append(actor)
    con = sqlite3.connect(f"file:{app.data_dir / 'upc.db'}?mode=ro", uri=True)
    try:
        for actor in actors:
            admin = con.execute("SELECT is_admin FROM users WHERE username = ?", (actor.name,))
            actor.is_admin = bool(admin.fetchone()[0])
            rows = con.execute(
                "SELECT c.id, m.id FROM messages m JOIN conversations c"
                " ON c.id = m.conversation_id JOIN users u ON u.id = c.user_id"
                " WHERE u.username = ?",
                (actor.name,),
            ).fetchall()
            actor.conversations = sorted({c for c, _ in rows})
            actor.messages = [m for _, m in rows]
    finally:
        con.close()
    return actors


def export_link(admin: Actor) -> str:
    """The admin exports every real dialogue, unscrubbed (the canaries stay in): the
    one-time link's path."""
    args = ["jsonl", "real", False, "", "", "", "", None, None, "any", ""]
    _, event, raw = gradio_call(admin.client, "console_export", args)
    found = re.search(r'href=\\"([^"\\]+)\\"', raw)
    assert event == "complete" and found, raw[-500:]
    return found.group(1)


def _console_endpoints(client: httpx.Client) -> dict[str, list[dict]]:
    info = client.get("/gradio_api/info").json()["named_endpoints"]
    return {
        name.lstrip("/"): spec["parameters"]
        for name, spec in info.items()
        if name.startswith("/console_")
    }


def _dummy(param: dict, value: str) -> object:
    if param.get("parameter_has_default"):
        return param.get("parameter_default")
    kind = json.dumps(param.get("python_type") or {})
    if "bool" in kind:
        return True
    if "float" in kind or "int" in kind:
        return 50
    return value


def console_matrix(
    app: RunningApp, admin: Actor, user: Actor, nobody: Actor, victim_cid: str
) -> dict[str, dict[str, str]]:
    """Every console handler called directly as nobody, as a user, and as the admin from a
    foreign origin and a foreign host: {handler: {caller: "refused" | what got through}}.
    The admin's own calls (our origin) are checked to reach the handler."""
    endpoints = _console_endpoints(admin.client)
    matrix: dict[str, dict[str, str]] = {}
    for name, params in sorted(endpoints.items()):
        data = [_dummy(p, victim_cid) for p in params]
        row: dict[str, str] = {}
        status, event, raw = gradio_call(nobody.client, name, data)
        row["anonymous"] = "refused" if status in (401, 403) else f"{status} {event} {raw[:80]}"
        status, event, raw = gradio_call(user.client, name, data)
        refused = event == "error" and ADMIN_ONLY in raw
        row["user"] = "refused" if refused else f"{status} {event} {raw[:80]}"
        for caller, headers in (
            ("foreign_origin", {"Origin": f"https://{FOREIGN}"}),
            ("null_origin", {"Origin": "null"}),
            ("foreign_host", {"Host": FOREIGN}),
        ):
            status, event, raw = gradio_call(admin.client, name, data, headers)
            row[caller] = "refused" if status == 403 else f"{status} {event} {raw[:80]}"
        status, event, raw = gradio_call(admin.client, name, data)
        row["admin_reaches_handler"] = "yes" if ADMIN_ONLY not in raw and status == 200 else raw
        matrix[name] = row
    return matrix


def _requests(
    attacker: Actor, victim: Actor, rng: random.Random, app: RunningApp, links: list[str]
) -> tuple[str, httpx.Response | tuple[int, str, str]]:
    """One random attack by `attacker` on `victim`: (kind, answer)."""
    c = attacker.client
    cid = rng.choice(victim.conversations)
    mid = rng.choice(victim.messages)
    data_dir = app.data_dir.resolve()
    kind = rng.choice(
        (
            "open_conversation", "load", "rate", "preferences", "new_conversation",
            "regenerate", "console", "console_open", "download", "file_route", "v1",
            "v1_models", "config", "info", "queue_join", "healthz",
        )
    )  # fmt: skip
    if kind == "open_conversation":
        return kind, gradio_call(c, "open_conversation", [cid, rng.choice(["", cid, mid])])
    if kind == "load":
        return kind, gradio_call(c, "load", [rng.choice(["", cid, victim.name, mid])])
    if kind == "rate":
        return kind, gradio_call(c, "rate", [rng.choice(["", cid])])
    if kind == "preferences":
        return kind, gradio_call(c, "preferences", [False, False, ""])
    if kind == "new_conversation":
        return kind, gradio_call(c, "new_conversation", [cid])
    if kind == "regenerate":
        return kind, gradio_call(c, "regenerate", [[{"role": "user", "content": "x"}], cid])
    if kind == "console":
        return kind, gradio_call(c, "console_conversations", [victim.name, "", "", "any"])
    if kind == "console_open":
        return kind, gradio_call(c, "console_open", [cid])
    if kind == "download":
        token = rng.choice([*links, "/download/" + "a" * 32])
        return kind, c.get(token)
    if kind == "file_route":
        target = rng.choice(
            ["upc.db", "upc.db-wal", "exports", "console-downloads", "session.key", "../upc.db"]
        )
        prefix = rng.choice(["/gradio_api/file=", "/file=", "/gradio_api/file=/tmp/gradio/../.."])
        return kind, c.get(f"{prefix}{data_dir / target}")
    if kind == "v1":
        key = rng.choice([app.api_key, "", "wrong-key"])
        body = {"messages": [{"role": "user", "content": f"show {cid}"}], "max_tokens": 4}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return kind, c.post("/v1/chat/completions", json=body, headers=headers)
    if kind == "v1_models":
        return kind, c.get("/v1/models", headers={"Authorization": f"Bearer {app.api_key}"})
    if kind == "config":
        return kind, c.get(rng.choice(["/config", "/gradio_api/config", "/"]))
    if kind == "info":
        return kind, c.get("/gradio_api/info")
    if kind == "queue_join":
        body = {"data": [cid], "fn_index": rng.randrange(60), "session_hash": "p" * 10}
        return kind, c.post("/gradio_api/queue/join", json=body)
    return kind, c.get("/healthz")


def probe(
    app: RunningApp,
    actors: list[Actor],
    nobody: Actor,
    n: int,
    rng: random.Random,
    links: list[str],
) -> ProbeReport:
    """`n` random cross-user requests; a leak is any foreign canary in an answer. The
    attackers are the users who are not admins (who may read everyone's chats in the
    console) and nobody; the victims are everyone, admins included."""
    report = ProbeReport()
    everyone = set().union(*(a.canaries for a in actors))
    pattern = re.compile("|".join(sorted(everyone)))
    attackers = [a for a in actors if not a.is_admin] + [nobody]
    for _ in range(n):
        attacker = rng.choice(attackers)
        victim = rng.choice([a for a in actors if a is not attacker])
        kind, answer = _requests(attacker, victim, rng, app, links)
        if isinstance(answer, httpx.Response):
            status, text = answer.status_code, answer.text
        else:
            status, _event, text = answer
        report.requests += 1
        report.by_kind[kind] += 1
        report.by_status[status] += 1
        found = set(pattern.findall(text)) - attacker.canaries
        if found:
            report.leaks.append(f"{kind} by {attacker.name} on {victim.name}: {sorted(found)}")
        if status >= 500:
            report.server_errors.append(f"{kind}: {status} {text[:120]}")
    return report


def probe_app_env() -> dict[str, str]:
    """Password mode; the sign-in throttle and per-minute limits out of the way (every
    probe comes from 127.0.0.1 and is not what is measured here)."""
    return {
        "UPC_AUTH__MODE": "password",
        "UPC_AUTH__LOGIN_IP_FREE_FAILURES": "100000",
        "UPC_AUTH__LOGIN_FREE_FAILURES": "100000",
        "UPC_LIMITS__MESSAGES_PER_MINUTE": "1000000",
        "UPC_LIMITS__ADDRESS_MESSAGES_PER_MINUTE": "1000000",
    }


def summarise_matrix(matrix: dict[str, dict[str, str]]) -> dict:
    callers = ("anonymous", "user", "foreign_origin", "null_origin", "foreign_host")
    not_refused = [
        f"{name} as {caller}: {row[caller]}"
        for name, row in matrix.items()
        for caller in callers
        if row[caller] != "refused"
    ]
    unreached = [n for n, row in matrix.items() if row["admin_reaches_handler"] != "yes"]
    return {
        "handlers": len(matrix),
        "calls": len(matrix) * len(callers),
        "refused": len(matrix) * len(callers) - len(not_refused),
        "not_refused": not_refused,
        "admin_calls_not_reaching_the_handler": unreached,
    }
