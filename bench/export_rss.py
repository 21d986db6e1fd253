"""Peak RSS and time of `upc export` per format on a synthetic database of N messages.

    python bench/export_rss.py --messages 1000000 [--workdir DIR] [--keep]

Builds the database once (executemany bulk inserts), then exports each format in a fresh
subprocess and reads that child's peak RSS (`ru_maxrss`). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._record import record

FORMATS = ("jsonl", "sharegpt", "parquet", "hf")
MESSAGES_PER_CONVERSATION = 10
USERS = 1000
_WORDS = [
    "the",
    "quick",
    "answer",
    "depends",
    "on",
    "what",
    "you",
    "want",
    "to",
    "learn",
    "next",
    "and",
    "how",
    "much",
    "time",
    "you",
    "have",
    "today",
    "we",
    "could",
    "look",
    "at",
    "a",
    "plan",
    "for",
    "the",
    "week",
    "or",
    "talk",
    "about",
    "the",
    "book",
    "you",
    "mentioned",
]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def build_db(data_dir: Path, messages: int, seed: int = 0) -> dict:
    from storage import Database

    started = time.monotonic()
    db = Database(f"sqlite:///{data_dir / 'upc.db'}", data_dir=data_dir)
    db.dispose()
    rng = random.Random(seed)
    con = sqlite3.connect(data_dir / "upc.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    t0 = datetime(2024, 1, 1)
    users = [(uuid.uuid4().hex, f"user{i}.name", str(t0)) for i in range(USERS)]
    con.executemany(
        "INSERT INTO users (id, username, is_admin, anonymous, memory_enabled, learning_opt_in,"
        " excluded_from_training, created_at) VALUES (?, ?, 0, 0, 1, 1, 0, ?)",
        users,
    )
    con.executemany(
        "INSERT INTO memory_facts (id, user_id, category, key, text, indexed, created_at,"
        " updated_at) VALUES (?, ?, 'location', 'location', ?, 0, ?, ?)",
        [
            (uuid.uuid4().hex, u[0], f"lives in Town{i}", str(t0), str(t0))
            for i, u in enumerate(users)
        ],
    )
    n_conv = max(1, messages // MESSAGES_PER_CONVERSATION)
    batch_conv: list[tuple] = []
    batch_msg: list[tuple] = []
    batch_fb: list[tuple] = []

    def flush() -> None:
        con.executemany(
            "INSERT INTO conversations (id, user_id, title, adapter_id, created_at, updated_at)"
            " VALUES (?, ?, ?, 'base', ?, ?)",
            batch_conv,
        )
        con.executemany(
            "INSERT INTO messages (id, conversation_id, seq, role, content, status, model_id,"
            " adapter_id, latency_ms, prompt_tokens, completion_tokens, created_at)"
            " VALUES (?, ?, ?, ?, ?, 'complete', ?, ?, ?, ?, ?, ?)",
            batch_msg,
        )
        con.executemany(
            "INSERT INTO feedback (message_id, user_id, rating, reason, created_at)"
            " VALUES (?, ?, ?, NULL, ?)",
            batch_fb,
        )
        batch_conv.clear()
        batch_msg.clear()
        batch_fb.clear()

    for c in range(n_conv):
        user_id, username, _ = users[c % USERS]
        created = str(t0 + timedelta(seconds=c * 30))
        conv_id = uuid.uuid4().hex
        batch_conv.append((conv_id, user_id, _text(rng, 4), created, created))
        for seq in range(MESSAGES_PER_CONVERSATION):
            mid = uuid.uuid4().hex
            if seq % 2 == 0:
                content = _text(rng, 30)
                if seq == 0:
                    content += f" I am {username}, mail {username}@example.com or +1 555 010 {c % 10000:04d}"
                batch_msg.append(
                    (mid, conv_id, seq, "user", content, None, None, None, None, None, created)
                )
            else:
                adapter = "base" if c % 3 else "adapter-1"
                batch_msg.append(
                    (
                        mid,
                        conv_id,
                        seq,
                        "assistant",
                        _text(rng, 40),
                        "smol",
                        adapter,
                        120.0,
                        200,
                        40,
                        created,
                    )
                )
                if rng.random() < 0.1:
                    batch_fb.append((mid, user_id, rng.choice((1, -1)), created))
        if len(batch_msg) >= 50_000:
            flush()
    flush()
    con.commit()
    con.close()
    return {"conversations": n_conv, "build_s": round(time.monotonic() - started, 1)}


def child(data_dir: Path, fmt: str) -> None:
    from learner.export import ExportOptions, export
    from storage import Database

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    db = Database(f"sqlite:///{data_dir / 'upc.db'}", data_dir=data_dir)
    started = time.monotonic()
    result = export(
        db,
        data_dir / "exports",
        ExportOptions(formats=(fmt,), export_id=f"bench-{fmt}", zip_hf_dataset=False),
        env={"UPC_EXPORT_SALT": "bench"},
    )
    elapsed = time.monotonic() - started
    sizes = {
        k: sum(p.stat().st_size for p in ([v] if v.is_file() else v.rglob("*")) if p.is_file())
        for k, v in result.files.items()
    }
    print(
        json.dumps(
            {
                "format": fmt,
                "seconds": round(elapsed, 1),
                "messages": result.messages,
                "conversations": result.conversations,
                "messages_per_s": round(result.messages / elapsed),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "import_rss_mb": round(base_rss / 1024, 1),
                "bytes": sizes,
                "scrubbed": result.scrubbed.to_dict(),
            }
        )
    )
    shutil.rmtree(result.directory)


def _child_result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"export child failed with exit status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="export the formats at the same time (each child's peak RSS is its own)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.workdir, args.child)
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="upc-export-bench-"))
    data_dir = work / "data"
    try:
        built = build_db(data_dir, args.messages) if not (data_dir / "upc.db").exists() else {}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        runs, pending = [], []
        for fmt in args.formats.split(","):
            cmd = [sys.executable, __file__, "--child", fmt, "--workdir", str(data_dir)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
            if args.parallel:
                pending.append(proc)
            else:
                runs.append(_child_result(proc))
        runs += [_child_result(proc) for proc in pending]
        record(
            "export_rss",
            {
                "benchmark": "export_rss",
                "messages": args.messages,
                **built,
                "db_bytes": (data_dir / "upc.db").stat().st_size,
                "parallel": args.parallel,
                "runs": runs,
            },
        )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
