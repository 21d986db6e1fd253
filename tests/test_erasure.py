"""Right to erasure: a canary planted in a user's chats, memory and training examples is
gone, byte for byte, from the database files, the Chroma dir and the training sets."""

from __future__ import annotations

import json

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from chatbot.memory import MemoryService
from core.embeddings import Embedder
from learner.critic import LogitCritic
from learner.curriculum import load_training_set
from learner.erasure import erase_user, find_user_id
from learner.logged import LoggedConfig, LoggedLearner, load_salt
from learner.logged_export import build_logged_training_set
from learner.registry import AdapterManifest, AdapterRegistry
from storage.db import Database
from tests.test_logged import DIALOGUE, seed_conversation, tiny_local  # noqa: F401

CANARY = "zebra-canary-7f3a91"


def _files(*roots):
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from (p for p in root.rglob("*") if p.is_file())


def _hits(paths, needle: bytes) -> list[str]:
    return [str(p) for p in paths if needle in p.read_bytes()]


def _database_files(request, db: Database, data_dir) -> list:
    """Where the database keeps its bytes: SQLite's file and WAL, or the PostgreSQL files
    of every table the user's data touched (heap, TOAST and indexes)."""
    if db.is_sqlite:
        return [data_dir / "upc.db", data_dir / "upc.db-wal"]
    cluster = request.getfixturevalue("postgres")
    cluster.checkpoint()  # pages still in shared buffers reach the files
    return [
        f
        for table in ("messages", "conversations", "memory_facts", "logged_turns", "users")
        for f in cluster.relation_files(db_url_of(db), table)
    ]


def db_url_of(db: Database) -> str:
    return db.url.replace("postgresql+psycopg://", "postgresql://")


def test_erasure_canary(request, db_url, data_dir, tiny_local, tiny_model_dir, tmp_path):  # noqa: F811
    db = Database(db_url, data_dir=data_dir)
    turns = [*DIALOGUE[:3], ("user", f"My secret word is {CANARY}."), DIALOGUE[4]]
    victim, _ = seed_conversation(db, "victim", turns)
    seed_conversation(db, "victim")
    other, _ = seed_conversation(db, "bystander")
    memory = MemoryService(db, Embedder(), chroma_path=data_dir / "chroma")
    memory.add_fact(victim, f"The user's pet zebra is called {CANARY}", category="other")
    memory.add_fact(other, "The user is a paediatric nurse", category="occupation")
    LoggedLearner(
        db,
        LogitCritic.from_local_model(tiny_local),
        None,
        salt=load_salt(data_dir),
        config=LoggedConfig(idle_minutes=30, accept_threshold=1),
        profile=memory.profile,
    ).run()
    runs = data_dir / "runs"
    build_logged_training_set(db, runs, 1, ratio=1.0, system_prompt="S")
    assert _hits(_files(runs), CANARY.encode())
    # An adapter "trained" on that set: its manifest lists the examples.
    selection = json.loads((runs / "iter-001" / "selection.json").read_text())
    staging = tmp_path / "staging"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(staging)
    registry = AdapterRegistry(data_dir / "adapters", db)
    registry.publish(
        staging, AdapterManifest(id="it001-test", training_dialogue_ids=selection["dialogue_ids"])
    )
    clean = AdapterManifest(id="it002-clean", training_dialogue_ids=["syn-1"])
    registry.publish(staging, clean)

    db_files = [*_database_files(request, db, data_dir), data_dir / "chroma"]
    assert _hits(_files(*db_files), CANARY.encode())  # planted where we will look

    assert find_user_id(db, "victim") == victim
    report = erase_user(
        db,
        victim,
        data_dir=data_dir,
        runs_dir=runs,
        registry=registry,
        memory=memory,
        chroma_dir=data_dir / "chroma",
    )
    assert report.conversations == 2 and report.logged_turns == 4
    assert report.memory_facts == 1 and report.training_rows_removed >= 4
    assert report.flagged_adapters == ["it001-test"]
    flagged = registry.get("it001-test")
    assert flagged.metrics["flags"][0]["kind"] == "erasure"
    assert "flags" not in registry.get("it002-clean").metrics

    # VACUUM FULL writes new PostgreSQL files; the old ones are gone.
    db_files = [*_database_files(request, db, data_dir), data_dir / "chroma"]
    assert _hits(_files(*db_files, runs), CANARY.encode()) == []
    assert not (data_dir / "upc.db-wal").exists() or (data_dir / "upc.db-wal").stat().st_size == 0
    assert find_user_id(db, "victim") is None
    # The bystander's data is intact.
    assert "nurse" in memory.profile(other)
    assert "nurse" in (runs / "iter-001" / "sft.jsonl").read_text()
    assert load_training_set(runs, 1).sft  # rewritten files still match selection.json
    memory.close()
    db.dispose()
