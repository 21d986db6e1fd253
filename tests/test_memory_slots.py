"""One-valued slots keep their history; the user edits and deletes facts (SQLite and
Chroma both follow). Real SQLite, real Chroma in a temp dir, real MiniLM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from chatbot.memory import MemoryService
from core.embeddings import Embedder
from core.settings import Settings, load_settings
from learner.erasure import erase_user
from storage import Database
from storage.memory_models import MemoryFactHistoryRow
from storage.models import User


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(env={}, data_dir=tmp_path / "data")


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database.from_settings(settings)
    yield database
    database.dispose()


@pytest.fixture
def memory(db: Database, embedder: Embedder, settings: Settings) -> Iterator[MemoryService]:
    service = MemoryService(db, embedder, chroma_path=settings.chroma_dir, retry_interval_s=0)
    yield service
    service.close()


def _user(db: Database, name: str) -> str:
    with db.session() as session:
        user = User(username=name)
        session.add(user)
        session.flush()
        return user.id


def _chroma(memory: MemoryService, uid: str) -> dict[str, np.ndarray]:
    collection = memory._index()
    assert collection is not None
    got = collection.get(where={"user_id": uid}, include=["embeddings"])
    return {i: np.asarray(e) for i, e in zip(got["ids"], got["embeddings"], strict=True)}


def test_moving_replaces_the_location_and_keeps_the_old_one_in_history(
    db: Database, memory: MemoryService
) -> None:
    uid = _user(db, "ana")
    lisbon = memory.remember(uid, "I live in Lisbon and I love surfing.", message_id="m1")
    porto = memory.remember(uid, "I moved to Porto last month.", message_id="m2")
    assert [f.text for f in porto] == ["moved to Porto last month"]
    current = {f.key: f.text for f in memory.list_facts(uid)}
    assert current == {"location": "moved to Porto last month", "hobby": "loves surfing"}
    history = memory.history(uid)
    assert [(h.key, h.text, h.replaced_by) for h in history] == [
        ("location", "lives in Lisbon", porto[0].id)
    ]
    assert history[0].created_at == lisbon[0].created_at
    # The old value is history, not memory: it is neither in Chroma nor recalled.
    assert lisbon[0].id not in _chroma(memory, uid)
    recalled = memory.recall(uid, "Which city does the user live in?", top_k=5)
    assert "lives in Lisbon" not in [f.text for f in recalled]

    # A third value: the whole chain stays, pointing at the current fact.
    berlin = memory.remember(uid, "I live in Berlin now.")[0]
    assert [h.text for h in memory.history(uid)] == [
        "moved to Porto last month",
        "lives in Lisbon",
    ]
    assert {h.replaced_by for h in memory.history(uid)} == {berlin.id}


def test_a_new_job_replaces_the_old_one(db: Database, memory: MemoryService) -> None:
    uid = _user(db, "ben")
    memory.remember(uid, "I work as a teacher.")
    memory.remember(uid, "I work as a nurse now.")
    assert [f.text for f in memory.list_facts(uid) if f.key == "occupation"] == [
        "works as a nurse now"
    ]
    assert [h.text for h in memory.history(uid)] == ["works as a teacher"]


def test_edit_rewrites_sqlite_and_chroma(db: Database, memory: MemoryService) -> None:
    uid = _user(db, "cai")
    fact = memory.remember(uid, "I have two dogs.")[0]
    before = _chroma(memory, uid)[fact.id]
    edited = memory.edit_fact(uid, fact.id, "has two cats", category="family")
    assert edited is not None
    assert (edited.id, edited.text, edited.category) == (fact.id, "has two cats", "family")
    assert [f.text for f in memory.list_facts(uid)] == ["has two cats"]
    after = _chroma(memory, uid)[fact.id]
    expected = memory.embedder.encode(["has two cats"])[0]
    assert float(np.dot(after, expected)) > 0.999
    assert float(np.dot(before, expected)) < 0.99
    assert memory.recall(uid, "cats", top_k=1)[0].text == "has two cats"
    # Someone else's fact, an unknown id, an empty text.
    other = _user(db, "dee")
    assert memory.edit_fact(other, fact.id, "has no pets") is None
    assert memory.list_facts(uid)[0].text == "has two cats"
    with pytest.raises(ValueError):
        memory.edit_fact(uid, fact.id, "   ")


def test_delete_is_immediate_in_sqlite_chroma_and_history(
    db: Database, memory: MemoryService
) -> None:
    uid = _user(db, "eve")
    memory.remember(uid, "I live in Lyon.")
    current = memory.remember(uid, "I moved to Nice.")[0]
    assert len(memory.history(uid)) == 1
    assert memory.delete_fact(uid, current.id)
    assert memory.list_facts(uid) == []
    assert current.id not in _chroma(memory, uid)
    assert memory.history(uid) == []
    assert memory.recall(uid, "Where does the user live?") == []


@pytest.mark.parametrize("through_service", [True, False])
def test_erasure_removes_history(
    db: Database, memory: MemoryService, settings: Settings, through_service: bool
) -> None:
    uid = _user(db, "fox")
    keep = _user(db, "gus")
    for who in (uid, keep):
        memory.remember(who, "I live in Oslo.")
        memory.remember(who, "I moved to Bergen.")
    erase_user(
        db,
        uid,
        data_dir=settings.data_dir,
        runs_dir=settings.data_dir / "runs",
        memory=memory if through_service else None,
        chroma_dir=None if through_service else settings.chroma_dir,
    )
    with db.session() as session:
        left = session.execute(select(MemoryFactHistoryRow.user_id)).scalars().all()
    assert left == [keep]
    if not through_service:
        # Erasure through its own client rebuilt the collection, so this service's handle is
        # stale: its next Chroma call fails over and reconnects, as a running app's does.
        assert [f.text for f in memory.recall(keep, "Where do I live?")]
    assert _chroma(memory, uid) == {}
    assert [h.text for h in memory.history(keep)] == ["lives in Oslo"]
