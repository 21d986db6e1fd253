"""Acknowledged chat turns lost when a replica dies: two app replicas (`upc serve`, embedded
model) on one throwaway PostgreSQL take `--sends` concurrent sends through the real UI API,
half each; once `--kill-after` turns are acknowledged, replica A is killed with SIGKILL while
its other replies are still streaming. A turn is acknowledged when the client got its
complete reply; every acknowledged turn is then read back through replica B (target: 0
lost).

    python bench/replica_lost_turns.py [--sends 200] [--kill-after 40] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradio_client import Client

from bench._record import record
from chatbot.accounts import Accounts
from core.runtime import ensure_embedded_model
from storage import Database
from tests.cluster import Cluster
from tests.servers import PostgresCluster

_SEND_TIMEOUT_S = 900.0


@dataclass
class Turn:
    bid: str
    text: str
    replica: int
    reply: str | None = None  # the complete reply the client got: acknowledged
    error: str | None = None


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _send(client: Client, turn: Turn, acked: threading.Semaphore) -> None:
    try:
        job = client.submit(turn.text, [], turn.bid, api_name="/send")
        _, history, status, _ = job.result(timeout=_SEND_TIMEOUT_S)
    except Exception as exc:  # the replica died under it: not acknowledged
        turn.error = type(exc).__name__
        return
    if status or not history or history[-1]["role"] != "assistant":
        turn.error = status or "no reply"
        return
    turn.reply = _text(history[-1])
    acked.release()


def _read_back(url: str, turn: Turn) -> bool:
    """Is the acknowledged turn, reply and all, what replica B shows this browser?"""
    history = Client(url, verbose=False).predict(turn.bid, api_name="/load")[2]
    texts = [(m["role"], _text(m)) for m in history]
    at = texts.index(("user", turn.text)) if ("user", turn.text) in texts else -1
    return at >= 0 and at + 1 < len(texts) and texts[at + 1] == ("assistant", turn.reply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sends", type=int, default=200)
    parser.add_argument("--kill-after", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    postgres = PostgresCluster().start()
    root = Path(tempfile.mkdtemp(prefix="upc-lost-turns-"))
    data_dir = root / "upc-data"
    model_dir = ensure_embedded_model(data_dir / "models")
    url = postgres.create_database()
    db = Database(url, data_dir=data_dir)
    accounts = Accounts(db)
    cluster = Cluster(root, data_dir, url, model_dir)
    started = time.monotonic()
    try:
        a, b = cluster.add_replicas(
            2,
            UPC_GENERATION__MAX_NEW_TOKENS=str(args.tokens),
            UPC_LIMITS__QUEUE_SIZE=str(args.sends),
        )
        turns = [
            Turn(accounts.issue_anonymous()[0], f"turn {i}: tell me about tea.", i % 2)
            for i in range(args.sends)
        ]
        urls = [a.base_url, b.base_url]
        with ThreadPoolExecutor(32) as pool:
            clients = list(pool.map(lambda t: Client(urls[t.replica], verbose=False), turns))
        acked = threading.Semaphore(0)
        sent_at = time.monotonic()
        with ThreadPoolExecutor(args.sends) as pool:
            for client, turn in zip(clients, turns, strict=True):
                pool.submit(_send, client, turn, acked)
            for _ in range(args.kill_after):
                acked.acquire()
            os.killpg(a.process.pid, signal.SIGKILL)
            killed_after_s = time.monotonic() - sent_at
        acknowledged = [t for t in turns if t.reply is not None]
        with ThreadPoolExecutor(8) as pool:
            readable = list(pool.map(lambda t: _read_back(b.base_url, t), acknowledged))
    finally:
        cluster.stop()
        db.dispose()
        postgres.stop()
    on_a = [t for t in turns if t.replica == 0]
    record(
        "acknowledged turns lost when a replica is killed mid-stream (2 replicas, PostgreSQL)",
        {
            "sends": args.sends,
            "max_new_tokens": args.tokens,
            "killed_replica_after_s": round(killed_after_s, 1),
            "acknowledged": len(acknowledged),
            "acknowledged_by_killed_replica": sum(t.reply is not None for t in on_a),
            "not_acknowledged_by_killed_replica": sum(t.reply is None for t in on_a),
            "not_acknowledged_by_survivor": sum(t.reply is None for t in turns if t.replica == 1),
            "lost_acknowledged": readable.count(False),
            "target_lost": 0,
            "wall_s": round(time.monotonic() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
