"""Memory on a real `chroma run` server (UPC_CHROMA_URL), on SQLite and PostgreSQL: add,
query, delete and rebuild; an outage degrades recall to the database and says so; when the
server comes back (even empty), memory catches up from the database by itself."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from chatbot.memory import MemoryService
from core.embeddings import Embedder
from learner.erasure import erase_user, find_user_id
from storage import Database
from storage.models import User
from tests.servers import ChromaServer, free_port


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def db(db_url, data_dir) -> Iterator[Database]:
    database = Database(db_url, data_dir=data_dir)
    yield database
    database.dispose()


def _service(db: Database, embedder: Embedder, server: ChromaServer, **kw) -> MemoryService:
    # A collection per test: the server is shared by the whole run.
    return MemoryService(
        db,
        embedder,
        chroma_url=server.url,
        collection_name=f"t-{uuid.uuid4().hex[:12]}",
        **kw,
    )


def _user(db: Database, name: str) -> str:
    with db.session() as session:
        user = User(username=name)
        session.add(user)
        session.flush()
        return user.id


def _server_ids(service: MemoryService, **where: str) -> set[str]:
    collection = service._index()
    assert collection is not None
    return set(collection.get(where=where or None)["ids"])


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_add_query_delete_rebuild_on_the_server(db, embedder, chroma_server) -> None:
    service = _service(db, embedder, chroma_server, ann_min_facts=1)  # ANN: server-side query
    ann, bo = _user(db, "ann"), _user(db, "bo")
    service.remember(ann, "I'm a pediatric nurse and I restore old motorbikes")
    service.remember(bo, "I work as a baker and I live in Oslo")
    facts = {f.text: f.id for f in service.list_facts(ann)}
    assert _server_ids(service, user_id=ann) == set(facts.values())
    assert [f.text for f in service.recall(ann, "bike trip this weekend", top_k=1)] == [
        "restores old motorbikes"
    ]
    assert "baker" not in service.context_block(ann, "bread and baking")
    # Our vectors only: the collection has no embedding function to fall back on.
    collection = service._index()
    assert collection.configuration["embedding_function"] is None
    with pytest.raises(ValueError, match="embedding function"):
        collection.query(query_texts=["motorbikes"], n_results=1)

    assert service.delete_fact(ann, facts["restores old motorbikes"])
    assert _server_ids(service, user_id=ann) == {facts["is a pediatric nurse"]}
    assert service.recall(ann, "motorbikes", top_k=1)[0].text == "is a pediatric nurse"
    assert service.rebuild() == 3
    assert len(_server_ids(service)) == 3
    assert service.forget_all(bo) == 2
    assert _server_ids(service, user_id=bo) == set()
    service.close()


def test_erasure_from_the_cli_path_reaches_the_server(db, embedder, chroma_server, data_dir):
    """`upc jobs erase` runs without the app's memory service: it deletes the user's
    vectors on the server itself, and a dead server is reported, not skipped silently."""
    service = _service(db, embedder, chroma_server)
    ann, bo = _user(db, "ann"), _user(db, "bo")
    service.remember(ann, "I'm a pediatric nurse and I restore old motorbikes")
    service.remember(bo, "I work as a baker and I live in Oslo")
    assert len(_server_ids(service, user_id=ann)) == 2
    report = erase_user(
        db,
        ann,
        data_dir=data_dir,
        runs_dir=data_dir / "runs",
        chroma_url=chroma_server.url,
        memory_collection=service.index.collection_name,
    )
    assert report.memory_facts == 2 and report.chroma_server_vectors == 2
    assert report.chroma_server_error is None
    assert _server_ids(service, user_id=ann) == set()
    assert len(_server_ids(service, user_id=bo)) == 2
    assert sorted(f.text for f in service.list_facts(bo)) == ["lives in Oslo", "works as a baker"]

    dead = erase_user(
        db,
        bo,
        data_dir=data_dir,
        runs_dir=data_dir / "runs",
        chroma_url=f"http://127.0.0.1:{free_port()}",
        memory_collection=service.index.collection_name,
    )
    assert dead.memory_facts == 2 and dead.chroma_server_vectors == 0
    assert "the Chroma server at http://127.0.0.1:" in (dead.chroma_server_error or "")
    assert find_user_id(db, "bo") is None  # the database erasure stands
    service.close()


def test_outage_degrades_then_memory_catches_up_with_no_manual_step(
    db, embedder, chroma_server, caplog
) -> None:
    service = _service(db, embedder, chroma_server, retry_interval_s=0.2, timeout_s=2.0)
    uid = _user(db, "cy")
    service.remember(uid, "I'm an architect")
    service.wait_caught_up()
    chroma_server.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="chatbot.memory"):
            stored = service.remember(uid, "I play the cello")  # acknowledged: in the database
            assert [f.text for f in stored] == ["plays the cello"]
            assert [f.text for f in service.recall(uid, "music", top_k=1)] == ["plays the cello"]
        assert "memory index (Chroma) failed" in caplog.text
        assert "database alone" in caplog.text
        assert service.index_available() is False
    finally:
        chroma_server.start()
    # Any use past the retry interval reconnects (here the health check, not a recall,
    # which would re-index this one user's facts by itself).
    _wait(lambda: service.index_available())
    service.wait_caught_up()
    every = {f.id for f in service.list_facts(uid)}
    assert _server_ids(service, user_id=uid) == every

    # The server comes back without its data: the database re-fills it.
    chroma_server.stop()
    shutil.rmtree(chroma_server.path)
    chroma_server.start()
    _wait(lambda: service.index_available())
    service.wait_caught_up()
    assert _server_ids(service, user_id=uid) == every
    service.close()


def test_a_hung_server_costs_a_recall_the_timeout_at_most(db, embedder, chroma_server) -> None:
    service = _service(db, embedder, chroma_server, retry_interval_s=60, timeout_s=1.0)
    uid = _user(db, "dee")
    service.remember(uid, "I work as a glassblower")
    service.wait_caught_up()
    assert chroma_server.process is not None
    os.kill(chroma_server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        recalled = service.recall(uid, "what do I do for a living", top_k=1)
        waited = time.monotonic() - started
    finally:
        os.kill(chroma_server.process.pid, signal.SIGCONT)
    assert [f.text for f in recalled] == ["works as a glassblower"]  # from the database
    assert waited < 4.0
    service.close()
