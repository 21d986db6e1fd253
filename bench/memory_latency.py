"""Memory retrieval latency and insert throughput; prints JSON.

For each size, N facts spread over `--users` users are bulk-loaded: precomputed random
unit vectors are written to SQLite and indexed into Chroma by `MemoryService.rebuild()`
(so the load also measures rebuild throughput). Queries then go through the real
`MemoryService.recall` path: once including the MiniLM query embedding, once with a
precomputed query vector (retrieval only). Insert throughput goes through `add_facts`
(dedup + SQLite commit + Chroma upsert) and `remember` (rules extraction too).

    python bench/memory_latency.py                  # 10k and 100k facts, 1,000 users
    python bench/memory_latency.py --quick          # 2k facts, fewer queries
    python bench/memory_latency.py --sizes 10000

On the deployed engines: `--chroma-url http://127.0.0.1:8000` (a `chroma run` server; each
size gets its own collection, dropped afterwards) and `--database-url postgresql://...`
(an empty database; each size's rows are deleted afterwards).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import delete, insert

from chatbot.memory import MemoryService
from core.embeddings import Embedder
from core.memory_extract import ExtractedFact
from storage import Database
from storage.memory_models import MEMORY_CATEGORIES, MemoryFactRow
from storage.models import User, new_id, utcnow

_QUERIES = [
    "How is the motorbike restoration going?",
    "I had a rough day at the hospital",
    "Any ideas for the weekend with the kids?",
    "What should I cook tonight?",
    "I'm nervous about my exam tomorrow",
    "Tell me something about jazz",
    "We are thinking of moving to another city",
    "My back hurts after the long run",
]
_MESSAGES = [
    "I'm a pediatric nurse and I restore old motorbikes",
    "I work as a teacher and I have two kids",
    "I live in Porto and I play the cello",
    "I'm worried about my thesis defense next month",
    "My hobby is birdwatching and I love hiking in the Alps",
]


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "n": len(samples_s),
    }


def _unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _bulk_load(db: Database, users: list[str], size: int, dim: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    now = utcnow()
    for offset in range(0, size, 5000):
        count = min(5000, size - offset)
        vectors = _unit_vectors(rng, count, dim)
        rows = []
        for j in range(count):
            i = offset + j
            category = MEMORY_CATEGORIES[i % len(MEMORY_CATEGORIES)]
            rows.append(
                {
                    "id": new_id(),
                    "user_id": users[i % len(users)],
                    "category": category,
                    "key": category,
                    "text": f"synthetic background fact number {i}",
                    "embedding": vectors[j].tobytes(),
                    "indexed": False,
                    "created_at": now - timedelta(seconds=size - i),
                    "updated_at": now - timedelta(seconds=size - i),
                }
            )
        with db.session() as session:
            session.execute(insert(MemoryFactRow), rows)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Engines:
    """Where the facts and vectors live: SQLite and embedded Chroma unless URLs are given."""

    database_url: str | None = None
    chroma_url: str | None = None


def _open(engines: Engines, data_dir: Path, embedder: Embedder) -> tuple[Database, MemoryService]:
    db = Database(engines.database_url or f"sqlite:///{data_dir / 'upc.db'}", data_dir=data_dir)
    if engines.chroma_url:
        service = MemoryService(
            db,
            embedder,
            chroma_url=engines.chroma_url,
            collection_name=f"bench-{data_dir.name}-{new_id()[:8]}",
        )
    else:
        service = MemoryService(db, embedder, chroma_path=data_dir / "chroma")
    return db, service


def _clean_up(engines: Engines, db: Database, service: MemoryService, users: list[str]) -> None:
    """Leave shared engines as they were: drop the server collection and the rows."""
    if engines.chroma_url:
        client = service.index._client
        if client is not None:
            client.delete_collection(service.collection_name)
    if engines.database_url:
        with db.session() as session:
            session.execute(delete(MemoryFactRow).where(MemoryFactRow.user_id.in_(users)))
            session.execute(delete(User).where(User.id.in_(users)))


def _run_size(
    size: int,
    n_users: int,
    n_queries: int,
    embedder: Embedder,
    root: Path,
    seed: int,
    engines: Engines,
) -> dict:
    data_dir = root / f"facts-{size}"
    db, service = _open(engines, data_dir, embedder)
    with db.session() as session:
        users = [new_id() for _ in range(n_users)]
        session.execute(insert(User), [{"id": u, "username": f"bench-{u}"} for u in users])
    load_s = _bulk_load(db, users, size, embedder.dim, seed)
    start = time.perf_counter()
    indexed = service.rebuild()
    rebuild_s = time.perf_counter() - start

    rnd = random.Random(seed)
    query_texts = [rnd.choice(_QUERIES) for _ in range(n_queries)]
    query_users = [rnd.choice(users) for _ in range(n_queries)]
    for i in range(5):  # warm caches and the embedder
        service.recall(query_users[i], query_texts[i])
    total, retrieval, embed = [], [], []
    query_vectors = embedder.encode(query_texts)
    for text, uid, vector in zip(query_texts, query_users, query_vectors, strict=True):
        t0 = time.perf_counter()
        facts = service.recall(uid, text, top_k=5, token_budget=160)
        total.append(time.perf_counter() - t0)
        assert facts and all(f.user_id == uid for f in facts)
        t0 = time.perf_counter()
        service.recall(uid, text, top_k=5, token_budget=160, query_vector=vector)
        retrieval.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        embedder.encode([text])
        embed.append(time.perf_counter() - t0)
    context = []
    for text, uid, vector in zip(query_texts, query_users, query_vectors, strict=True):
        t0 = time.perf_counter()
        service.context_block(uid, text, query_vector=vector)
        context.append(time.perf_counter() - t0)

    # For reference: Chroma's own filtered HNSW query over all users' vectors.
    collection = service._index()
    filtered = []
    for uid, vector in list(zip(query_users, query_vectors, strict=True))[:50]:
        t0 = time.perf_counter()
        collection.query(query_embeddings=[vector], n_results=5, where={"user_id": uid})
        filtered.append(time.perf_counter() - t0)

    # Insert throughput through the real write path.
    n_inserts = max(20, min(200, n_queries))
    insert_vectors = _unit_vectors(np.random.default_rng(seed + 1), n_inserts, embedder.dim)
    t0 = time.perf_counter()
    for i in range(n_inserts):
        service.add_facts(
            users[i % n_users],
            [ExtractedFact("hobby", "hobby", f"bench insert {i}", insert_vectors[i])],
        )
    add_s = time.perf_counter() - t0
    n_messages = max(10, n_inserts // 4)
    t0 = time.perf_counter()
    stored = 0
    for i in range(n_messages):
        stored += len(service.remember(users[i % n_users], _MESSAGES[i % len(_MESSAGES)]))
    remember_s = time.perf_counter() - t0
    _clean_up(engines, db, service, users)
    service.close()
    db.dispose()
    return {
        "facts": size,
        "users": n_users,
        "facts_per_user": size / n_users,
        "load": {
            "database_insert_s": round(load_s, 2),
            "rebuild_s": round(rebuild_s, 2),
            "rebuild_facts_per_s": round(indexed / rebuild_s, 1),
        },
        "recall_total": _percentiles(total),
        "recall_retrieval_only": _percentiles(retrieval),
        "query_embedding": _percentiles(embed),
        "context_block_retrieval_only": _percentiles(context),
        "chroma_filtered_hnsw_query_reference": _percentiles(filtered),
        "insert": {
            "add_facts_per_s": round(n_inserts / add_s, 1),
            "add_fact_mean_ms": round(add_s / n_inserts * 1000, 2),
            "remember_messages_per_s": round(n_messages / remember_s, 1),
            "remember_mean_ms": round(remember_s / n_messages * 1000, 2),
            "remember_facts_stored": stored,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated fact counts")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="2,000 facts, 50 queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the stores here")
    parser.add_argument("--chroma-url", default=None, help="a Chroma server (chroma run)")
    parser.add_argument("--database-url", default=None, help="an empty database, e.g. PostgreSQL")
    args = parser.parse_args(argv)
    engines = Engines(args.database_url, args.chroma_url)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = [2000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    n_queries = 50 if args.quick else args.queries
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="upc-memory-bench-"))
    embedder = Embedder()
    embedder.encode(["warm up"])
    results = []
    try:
        for size in sizes:
            started = time.perf_counter()
            result = _run_size(size, args.users, n_queries, embedder, root, args.seed, engines)
            result["wall_s"] = round(time.perf_counter() - started, 1)
            results.append(result)
            print(f"done {size} facts in {result['wall_s']}s", file=sys.stderr, flush=True)
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "memory_latency",
        "bulk_load": (
            "precomputed random unit vectors (not MiniLM) written to SQLite, then indexed into "
            "Chroma via MemoryService.rebuild(); queries use the real recall path"
        ),
        "target": "recall p95 <= 25 ms at 100k facts (<= 40 ms on a Chroma server)",
        "engines": {
            "database": "postgresql" if args.database_url else "sqlite",
            "chroma": "server" if args.chroma_url else "embedded",
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
