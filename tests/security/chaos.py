"""kill -9 chaos for the running system: the parts shared by `tests/security/test_kill9.py`
(a few cycles) and `bench/chaos/kill9.py` (hundreds).

One data dir, three kinds of process on it, as in production: the app (tiny random model,
real tokenizer, real SQLite, real HTTP), the learning worker (curriculum iterations:
generate, select, train, gate, promote) and `upc erase`. Each cycle kills one of them with
SIGKILL at a random point of its work, restarts what was killed and checks:

- every user message the server acknowledged (a streamed reply had begun, so the message
  was committed) is on disk, and every reply the client saw finish is stored `complete`;
- no reply is left `streaming` once the app is back: cut-off replies are `interrupted`;
- every published adapter dir verifies, `ACTIVE` names one of them (or the base) and so
  does what the app reports serving;
- `PRAGMA integrity_check` answers ok.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from learner.adapter_files import AdapterError
from learner.adapter_manifest import verify_adapter_dir
from tests.conftest import REPO, make_app

__all__ = [
    "TARGETS",
    "Chaos",
    "CycleResult",
    "Ledger",
    "summarise",
]

TARGETS = ("chat", "generation", "training", "promotion", "erasure")
_WORKER = (
    "import logging,sys; logging.basicConfig(level=logging.INFO);"
    "from core.settings import load_settings; from learner.worker import run_worker;"
    "sys.exit(run_worker(load_settings(), unit_s=float(sys.argv[1])))"
)
# The stage each worker target waits for before the random delay of its kill.
_STAGE_OF = {"generation": "generate", "training": "train", "promotion": "gate"}


@dataclass
class Ledger:
    """What the server acknowledged to the chat clients (thread-safe)."""

    acked: dict[str, str] = field(default_factory=dict)  # canary -> browser id
    finished: set[str] = field(default_factory=set)  # canaries whose reply completed
    erased: set[str] = field(default_factory=set)  # browser ids of erased users
    refused: list[str] = field(default_factory=list)  # sends the server turned down
    lock: threading.Lock = field(default_factory=threading.Lock)

    def live(self) -> dict[str, str]:
        with self.lock:
            return {c: b for c, b in self.acked.items() if b not in self.erased}


@dataclass
class CycleResult:
    cycle: int
    target: str
    killed_at: str  # what the victim was doing (a stage, "streaming", a delay)
    lost_turns: int = 0
    lost_replies: int = 0
    left_streaming: int = 0
    interrupted_rows: int = 0
    bad_adapters: list[str] = field(default_factory=list)
    served: str = ""
    integrity: str = ""
    seconds: float = 0.0
    erased_left: int = 0  # messages of users whose erasure finished, still stored

    @property
    def ok(self) -> bool:
        return (
            not self.lost_turns
            and not self.lost_replies
            and not self.left_streaming
            and not self.bad_adapters
            and self.integrity == "ok"
            and not self.erased_left
        )


def _sse_send(base: str, text: str, history: list, bid: str, ledger: Ledger, canary: str) -> list:
    """One `send` through Gradio's HTTP API; records the ack (first streamed update) and the
    finish. Returns the history the client would show next (or the old one)."""
    with httpx.Client(base_url=base, timeout=httpx.Timeout(60, connect=5)) as http:
        r = http.post("/gradio_api/call/send", json={"data": [text, history, bid]})
        r.raise_for_status()
        event_id = r.json()["event_id"]
        last = None
        with http.stream("GET", f"/gradio_api/call/send/{event_id}") as stream:
            event = ""
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event in ("generating", "complete"):
                    with ledger.lock:
                        ledger.acked.setdefault(canary, bid)
                    update = json.loads(line[6:])
                    # An output left unchanged by an update comes as None.
                    last = [
                        n if n is not None else o
                        for o, n in zip(last or update, update, strict=False)
                    ]
                    if event == "complete":
                        with ledger.lock:
                            ledger.finished.add(canary)
        # `send` answers over HTTP (text box, state, chat history, state, status line,
        # conversation list); the states come as None.
        if last is None or "⚠" in str(last[4]):
            with ledger.lock:
                ledger.refused.append(str(last)[:300])
            return history
        return last[2]


def _chat_user(
    base: str,
    ledger: Ledger,
    stop: threading.Event,
    rng: random.Random,
    *,
    at_least_one: bool = False,
) -> None:
    """A browser that chats until `stop` (after one message if `at_least_one`) or until
    its server dies."""
    try:
        r = httpx.post(f"{base}/gradio_api/call/load", json={"data": [""]}, timeout=30)
        event_id = r.json()["event_id"]
        text = httpx.get(f"{base}/gradio_api/call/load/{event_id}", timeout=60).text
        data = json.loads(re.findall(r"event: complete\ndata: (.*)", text)[-1])
        bid, history = data[0], data[2]
        while at_least_one or not stop.is_set():
            at_least_one = False
            canary = f"canary-{rng.getrandbits(48):012x}"
            history = _sse_send(base, f"{canary} tell me more", history, bid, ledger, canary)
            history = history[-6:]  # the client keeps a short tail; the server has it all
    except (httpx.HTTPError, ValueError, IndexError, KeyError, TypeError):
        return  # the server was killed under us: what it acknowledged is in the ledger


def _db_checks(db_path: Path, ledger: Ledger) -> tuple[int, int, int, int, str, int]:
    """(lost acknowledged turns, lost finished replies, rows streaming, rows interrupted,
    integrity_check, messages of erased users still there) on a read-only connection."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=60)
    try:
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        rows = con.execute(
            "SELECT m.content, m.status, m.role, m.conversation_id, m.seq FROM messages m"
        ).fetchall()
    finally:
        con.close()
    by_conv: dict[str, dict[int, tuple[str, str, str]]] = {}
    user_text: dict[str, tuple[str, int]] = {}
    for content, status, role, conv, seq in rows:
        by_conv.setdefault(conv, {})[seq] = (role, status, content)
        if role == "user":
            user_text[content.split(" ", 1)[0]] = (conv, seq)
    live = ledger.live()
    with ledger.lock:
        finished = set(ledger.finished)
    lost = [c for c in live if c not in user_text]
    with ledger.lock:
        gone = {c for c, b in ledger.acked.items() if b in ledger.erased}
    erased_left = len(gone & set(user_text))
    lost_replies = 0
    for canary in finished & set(live):
        if canary not in user_text:
            continue
        conv, seq = user_text[canary]
        after = [v for s, v in sorted(by_conv[conv].items()) if s > seq]
        if not any(r == "assistant" and st in ("complete", "superseded") for r, st, _ in after):
            lost_replies += 1
    streaming = sum(1 for r in rows if r[1] == "streaming")
    interrupted = sum(1 for r in rows if r[1] == "interrupted")
    return len(lost), lost_replies, streaming, interrupted, integrity, erased_left


def _adapter_checks(adapters_dir: Path) -> tuple[list[str], set[str], str]:
    """(published dirs that fail verification, verified ids, ACTIVE)."""
    bad: list[str] = []
    good: set[str] = set()
    if adapters_dir.is_dir():
        for entry in sorted(adapters_dir.iterdir()):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                verify_adapter_dir(entry)
                good.add(entry.name)
            except (AdapterError, OSError, ValueError) as exc:  # a half-written adapter
                bad.append(f"{entry.name}: {exc}")
    active_file = adapters_dir / "ACTIVE"
    active = active_file.read_text().strip() if active_file.exists() else "base"
    if active not in good | {"base"}:
        bad.append(f"ACTIVE names {active!r}, not a verified adapter")
    return bad, good, active or "base"


class Chaos:
    """The system under test in `root`, and the kill cycles."""

    def __init__(self, root: Path, model_dir: Path, seed: int, max_new_tokens: int = 100):
        self.root = root
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.data_dir = root / "upc-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.app = make_app(
            self.data_dir,
            root,
            UPC_CHATBOT__MODEL=str(model_dir),
            UPC_MEMORY__ENABLED="false",
            UPC_AUTH__MODE="anonymous",
            UPC_GENERATION__MAX_NEW_TOKENS=str(max_new_tokens),
            UPC_LIMITS__MESSAGES_PER_MINUTE="1000000",
            UPC_LIMITS__ADDRESS_MESSAGES_PER_MINUTE="1000000",
            UPC_LIMITS__CONTEXT_TOKENS="2048",
        )
        self.worker_env = _worker_env(self.app.env, model_dir)
        self.worker: subprocess.Popen | None = None

    # -------------------------------------------------------------- processes
    def start_app(self) -> None:
        self.app.start()

    def stop_all(self) -> None:
        self._kill_worker(signal.SIGTERM)
        self.app.stop()

    def _start_worker(self) -> subprocess.Popen:
        log = (self.root / "worker.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-c", _WORKER, "1.0"],
            cwd=REPO,
            env=self.worker_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _kill_worker(self, sig: int = signal.SIGKILL) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, sig)
            self.worker.wait(timeout=60)
        self.worker = None

    def _stage(self) -> str:
        try:
            con = sqlite3.connect(f"file:{self.data_dir / 'upc.db'}?mode=ro", uri=True, timeout=5)
            try:
                row = con.execute(
                    "SELECT stage, running FROM job_progress WHERE job = 'curriculum'"
                ).fetchone()
            finally:
                con.close()
        except sqlite3.Error:
            return ""
        return row[0] if row and row[1] else ""

    # ----------------------------------------------------------------- cycles
    def cycle(self, n: int, target: str) -> CycleResult:
        started = time.monotonic()
        if target == "chat":
            killed_at = self._chat_cycle()
        elif target == "erasure":
            killed_at = self._erasure_cycle()
        else:
            killed_at = self._worker_cycle(target)
        result = self._check(n, target, killed_at)
        result.seconds = round(time.monotonic() - started, 2)
        return result

    def _chat_cycle(self) -> str:
        """Two browsers chat; the app is killed 0.5-6 s in (a greeting, then replies of
        up to 100 tokens, under a second each), then started again."""
        stop = threading.Event()
        users = [
            threading.Thread(
                target=_chat_user,
                args=(self.app.base_url, self.ledger, stop, random.Random(self.rng.random())),
                daemon=True,
            )
            for _ in range(2)
        ]
        for u in users:
            u.start()
        time.sleep(self.rng.uniform(0.5, 6.0))
        streaming = self._rows_streaming()
        self.app.stop(signal.SIGKILL)
        stop.set()
        for u in users:
            u.join(timeout=30)
        self.app.start()
        return "streaming" if streaming else "between replies"

    def _rows_streaming(self) -> int:
        con = sqlite3.connect(f"file:{self.data_dir / 'upc.db'}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT count(*) FROM messages WHERE status='streaming'").fetchone()[
                0
            ]
        finally:
            con.close()

    def _worker_cycle(self, target: str) -> str:
        """Start the worker (it catches up on a killed iteration), wait for the target's
        stage, kill it a random moment later."""
        self.worker = self._start_worker()
        wanted = _STAGE_OF[target]
        deadline = time.monotonic() + 300
        stage = self._stage()
        while stage != wanted and time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise RuntimeError(f"worker died:\n{self._worker_log()}")
            time.sleep(0.05)
            stage = self._stage()
        if stage != wanted:
            raise RuntimeError(f"worker never reached {wanted}:\n{self._worker_log()}")
        if target == "promotion":
            # Promotion is a few milliseconds: poll fast and kill the moment it starts.
            while stage == "gate" and time.monotonic() < deadline:
                time.sleep(0.002)
                stage = self._stage()
            time.sleep(self.rng.uniform(0, 0.02))
        else:
            time.sleep(self.rng.uniform(0, 1.5))
            stage = self._stage() or stage
        self._kill_worker()
        return stage

    def _worker_log(self) -> str:
        return (self.root / "worker.log").read_text(errors="replace")[-3000:]

    def _erasure_cycle(self) -> str:
        """`python -m learner erase` of a user who chatted, killed at a random moment; the
        restart (the same command again) must finish it."""
        victim = self._pick_victim()
        if victim is None:  # nobody has chatted yet: one short chat, without a kill
            stop = threading.Event()
            stop.set()  # one message, then the loop ends
            _chat_user(self.app.base_url, self.ledger, stop, self.rng, at_least_one=True)
            victim = self._pick_victim()
        if victim is None:
            raise RuntimeError("a chat before the erasure left no acknowledged message")
        bid, name = victim
        args = [sys.executable, "-m", "learner", "erase", name, "--yes"]
        proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=self.app.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        delay = self.rng.uniform(1.0, 5.0)  # the command takes ~3-6 s, most of it imports
        try:
            proc.wait(timeout=delay)
            killed_at = "finished before the kill"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            killed_at = f"{delay:.1f} s in"
        done = subprocess.run(args, cwd=REPO, env=self.app.env, capture_output=True, timeout=300)
        if done.returncode not in (0, 2):  # 2: the killed run had already removed them
            raise RuntimeError(f"erase failed: {done.stderr.decode()[-2000:]}")
        with self.ledger.lock:
            self.ledger.erased.add(bid)
        return killed_at

    def _pick_victim(self) -> tuple[str, str] | None:
        live = self.ledger.live()
        if not live:
            return None
        canary = self.rng.choice(sorted(live))
        con = sqlite3.connect(f"file:{self.data_dir / 'upc.db'}?mode=ro", uri=True, timeout=30)
        try:
            row = con.execute(
                "SELECT u.username FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                " JOIN users u ON u.id = c.user_id WHERE m.role = 'user' AND m.content LIKE ?",
                (canary + " %",),
            ).fetchone()
        finally:
            con.close()
        return (live[canary], row[0]) if row else None

    def _check(self, n: int, target: str, killed_at: str) -> CycleResult:
        lost, lost_replies, streaming, interrupted, integrity, erased_left = _db_checks(
            self.data_dir / "upc.db", self.ledger
        )
        bad, good, _active = _adapter_checks(self.data_dir / "adapters")
        served = httpx.get(f"{self.app.base_url}/healthz", timeout=30).json().get("adapter")
        served = served or "base"
        if served not in good | {"base"}:
            bad.append(f"the app serves {served!r}, not a verified adapter")
        result = CycleResult(
            n, target, killed_at, lost, lost_replies, streaming, interrupted, bad, served, integrity
        )
        result.erased_left = erased_left
        return result


def _worker_env(app_env: dict[str, str], model_dir: Path) -> dict[str, str]:
    """The worker: back-to-back curriculum iterations on the tiny model that always promote
    (so promotion really happens), with a few seconds of training to be killed in."""
    return {
        **app_env,
        "UPC_CRITIC__MODEL": str(model_dir),
        "UPC_USER_SIM__MODEL": str(model_dir),
        "UPC_LEARNER__CRITIC": "llm",
        "UPC_GENERATION__MAX_NEW_TOKENS": "12",
        "UPC_LEARNER__SCHEDULER_LEASE_SECONDS": "3",
        "UPC_LEARNER__SCHEDULER_POLL_SECONDS": "0.3",
        "UPC_LEARNER__CURRICULUM_INTERVAL_MINUTES": "1",
        "UPC_LEARNER__CRITIQUE_INTERVAL_MINUTES": "100000",
        "UPC_LEARNER__RETRAIN_CHECK_MINUTES": "100000",
        "UPC_LEARNER__MAX_REGENERATIONS": "1",
        "UPC_LEARNER__CURRICULUM_USERS": "2",
        "UPC_LEARNER__TURNS": "2",
        "UPC_LEARNER__ALPHA": "1",
        "UPC_LEARNER__BETA": "0",
        "UPC_LEARNER__GATE_USERS": "1",
        "UPC_LEARNER__GATE_MARGIN": "-5",
        "UPC_LEARNER__GATE_TOLERANCE": "1e9",
        "UPC_LEARNER__LORA_RANK": "4",
        "UPC_LEARNER__MAX_SEQ_LEN": "256",
        "UPC_LEARNER__EPOCHS": "4",
        "UPC_LEARNER__SKIP_FLAGGED_TARGETS": "false",
    }


def summarise(results: list[CycleResult], ledger: Ledger) -> dict:
    """The JSON the bench prints."""
    by_target: dict[str, int] = {}
    killed_at: dict[str, dict[str, int]] = {}
    for r in results:
        by_target[r.target] = by_target.get(r.target, 0) + 1
        where = killed_at.setdefault(r.target, {})
        where[r.killed_at] = where.get(r.killed_at, 0) + 1
    failures = [r.__dict__ for r in results if not r.ok]
    return {
        "cycles": len(results),
        "acknowledged_turns": len(ledger.acked),
        "finished_replies": len(ledger.finished),
        "erased_users": len(ledger.erased),
        "refused_sends": len(ledger.refused),
        "refused_examples": ledger.refused[:5],
        "by_target": by_target,
        "killed_at": killed_at,
        "lost_acknowledged_turns": sum(r.lost_turns for r in results),
        "lost_finished_replies": sum(r.lost_replies for r in results),
        "left_streaming_after_restart": sum(r.left_streaming for r in results),
        "interrupted_rows_at_end": results[-1].interrupted_rows if results else 0,
        "half_written_adapters_or_bad_active": sum(len(r.bad_adapters) for r in results),
        "integrity_failures": sum(r.integrity != "ok" for r in results),
        "erased_messages_left": sum(r.erased_left for r in results),
        "failed_cycles": failures[:20],
        "median_cycle_s": sorted(r.seconds for r in results)[len(results) // 2] if results else 0,
    }
