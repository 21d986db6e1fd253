"""The fact store: a user's facts in the database, the truth that the vector index follows.

Every method is scoped to one user id; an unknown user id fails closed
(`MemoryScopeError`). Each fact keeps its vector in SQLite too, so recall works, and the
index can be rebuilt, without Chroma.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, undefer

from core.embeddings import Embedder
from core.memory_extract import SINGLE_VALUED_KEYS, ExtractedFact
from storage.db import Database
from storage.memory_models import MEMORY_CATEGORIES, MemoryFactHistoryRow, MemoryFactRow
from storage.models import User, utcnow

__all__ = [
    "FactStore",
    "FactVector",
    "MemoryFact",
    "MemoryFactHistory",
    "MemoryScopeError",
    "StoredFacts",
    "require_user_id",
]

_BATCH = 1000
# Profile order: who they are first, then what they do and care about.
_CATEGORY_RANK = {c: i for i, c in enumerate(MEMORY_CATEGORIES)}


class MemoryScopeError(ValueError):
    """A memory call without a usable user id (missing, empty or unknown): fail closed."""


@dataclass(frozen=True)
class MemoryFact:
    id: str
    user_id: str
    category: str
    key: str
    # Third-person phrase without subject ("restores old motorbikes"), or free text.
    text: str
    source_message_id: str | None
    source_conversation_id: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def statement(self) -> str:
        """One clean line: "The user restores old motorbikes."."""
        text = " ".join(self.text.split())
        lowered = text.lower()
        if not lowered.startswith(("the user", "user ", "i ", "i'm", "my ")):
            text = f"The user {text}"
        return text if text.endswith((".", "!", "?")) else text + "."


@dataclass(frozen=True)
class MemoryFactHistory:
    """An earlier value of a one-valued slot, replaced by the fact `replaced_by`."""

    id: str
    user_id: str
    replaced_by: str
    category: str
    key: str
    text: str
    created_at: datetime
    replaced_at: datetime


@dataclass(frozen=True)
class FactVector:
    """One fact's vector with the metadata the index filters on."""

    fact_id: str
    user_id: str
    category: str
    key: str
    vector: np.ndarray


@dataclass(frozen=True)
class StoredFacts:
    """What one write did: the facts stored or updated, their vectors, the facts replaced."""

    facts: list[MemoryFact]
    vectors: list[FactVector]
    removed: list[str]


def require_user_id(user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise MemoryScopeError("a memory operation needs the user id (got none)")
    return user_id


def _fact(row: MemoryFactRow) -> MemoryFact:
    return MemoryFact(
        id=row.id,
        user_id=row.user_id,
        category=row.category,
        key=row.key,
        text=row.text,
        source_message_id=row.source_message_id,
        source_conversation_id=row.source_conversation_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def _from_blob(blob: bytes | None, dim: int) -> np.ndarray | None:
    if not blob:
        return None
    vector = np.frombuffer(blob, dtype=np.float32)
    return vector if vector.shape == (dim,) else None


class FactStore:
    """Users' facts in SQLite: scoped reads, deduplicating writes, deletions."""

    def __init__(self, db: Database, embedder: Embedder, *, dedup_threshold: float, enabled: bool):
        if not 0.0 < dedup_threshold <= 1.0:
            raise ValueError("dedup_threshold must be in (0, 1]")
        self.db = db
        self.embedder = embedder
        self.dedup_threshold = dedup_threshold
        self.enabled = enabled  # the global switch, above each user's own

    # ------------------------------------------------------------------ users

    def _user_enabled(self, session: Session, user_id: str) -> bool:
        enabled = session.execute(
            select(User.memory_enabled).where(User.id == user_id)
        ).scalar_one_or_none()
        if enabled is None:
            raise MemoryScopeError("unknown user id")
        return bool(enabled) and self.enabled

    def is_enabled(self, user_id: str) -> bool:
        """Memory on for this user (and globally); `MemoryScopeError` for an unknown user."""
        with self.db.session() as session:
            return self._user_enabled(session, user_id)

    def set_enabled(self, user_id: str, enabled: bool) -> None:
        with self.db.session() as session:
            result = session.execute(
                update(User).where(User.id == user_id).values(memory_enabled=bool(enabled))
            )
            if result.rowcount == 0:
                raise MemoryScopeError("unknown user id")

    # ------------------------------------------------------------------ writes

    def store(
        self,
        uid: str,
        extracted: Sequence[ExtractedFact],
        vectors: Sequence[np.ndarray],
        message_id: str | None,
        conversation_id: str | None,
    ) -> StoredFacts:
        """Merge the facts into the user's facts in one transaction (committed on return)."""
        dim = self.embedder.dim
        touched: dict[str, MemoryFactRow] = {}
        removed: list[str] = []
        with self.db.session() as session:
            existing = list(
                session.execute(
                    select(MemoryFactRow)
                    .options(undefer(MemoryFactRow.embedding))
                    .where(MemoryFactRow.user_id == uid)
                )
                .scalars()
                .all()
            )
            for fact, vector in zip(extracted, vectors, strict=True):
                row, dropped = self._merge(session, uid, existing, fact, vector, dim)
                row.source_message_id = message_id
                row.source_conversation_id = conversation_id
                touched[row.id] = row
                removed.extend(dropped)
                existing = [r for r in existing if r.id not in dropped]
            session.flush()
            stored = [_fact(r) for r in touched.values()]
            to_index = []
            for r in touched.values():
                vector = _from_blob(r.embedding, dim)
                if vector is not None:
                    to_index.append(FactVector(r.id, uid, r.category, r.key, vector))
        return StoredFacts(stored, to_index, removed)

    def _merge(
        self,
        session: Session,
        uid: str,
        existing: list[MemoryFactRow],
        fact: ExtractedFact,
        vector: np.ndarray,
        dim: int,
    ) -> tuple[MemoryFactRow, list[str]]:
        """Dedup one new fact against the user's facts: update, replace or insert."""
        now = utcnow()
        single = fact.key in SINGLE_VALUED_KEYS or fact.key.startswith("favorite_")
        pool = [r for r in existing if r.key == fact.key] if single else existing
        best: MemoryFactRow | None = None
        best_sim = -1.0
        for row in pool:
            other = _from_blob(row.embedding, dim)
            if other is None:
                continue
            sim = float(np.dot(other, vector))
            if sim > best_sim:
                best, best_sim = row, sim
        target = best if best is not None and best_sim > self.dedup_threshold else None
        # A newer value of a one-valued slot contradicts (replaces) the older ones.
        replaced = [row for row in pool if row is not target] if single else []
        for row in replaced:
            session.delete(row)
        if target is None:
            target = MemoryFactRow(
                user_id=uid, category=fact.category, key=fact.key, created_at=now
            )
            session.add(target)
            existing.append(target)
        # A restated fact keeps its id, slot and creation time; its wording is refreshed.
        target.text = fact.text
        target.embedding = _to_blob(vector)
        target.indexed = False
        target.updated_at = now
        session.flush()
        self._keep_history(session, uid, target.id, replaced, now)
        return target, [row.id for row in replaced]

    @staticmethod
    def _keep_history(
        session: Session, uid: str, current: str, replaced: list[MemoryFactRow], now: datetime
    ) -> None:
        """The replaced values go to the slot's history, and their own history follows."""
        if not replaced:
            return
        old_ids = [row.id for row in replaced]
        session.execute(
            update(MemoryFactHistoryRow)
            .where(
                MemoryFactHistoryRow.user_id == uid,
                MemoryFactHistoryRow.replaced_by.in_(old_ids),
            )
            .values(replaced_by=current)
        )
        for row in replaced:
            session.add(
                MemoryFactHistoryRow(
                    user_id=uid,
                    replaced_by=current,
                    category=row.category,
                    key=row.key,
                    text=row.text,
                    source_message_id=row.source_message_id,
                    source_conversation_id=row.source_conversation_id,
                    created_at=row.created_at,
                    replaced_at=now,
                )
            )
        session.flush()

    def mark_indexed(self, ids: Sequence[str]) -> None:
        with self.db.session() as session:
            session.execute(
                update(MemoryFactRow).where(MemoryFactRow.id.in_(ids)).values(indexed=True)
            )

    def count_indexed(self) -> int:
        """How many facts (of every user) are marked as present in the vector index."""
        with self.db.session() as session:
            return int(
                session.scalar(
                    select(func.count(MemoryFactRow.id)).where(MemoryFactRow.indexed.is_(True))
                )
                or 0
            )

    def pending(self, after: str, limit: int) -> list[FactVector]:
        """Up to `limit` facts (of every user) not yet in the index, by id after `after`;
        a fact stored without a vector is embedded now."""
        dim = self.embedder.dim
        with self.db.session() as session:
            rows = list(
                session.execute(
                    select(MemoryFactRow)
                    .options(undefer(MemoryFactRow.embedding))
                    .where(MemoryFactRow.indexed.is_(False), MemoryFactRow.id > after)
                    .order_by(MemoryFactRow.id)
                    .limit(limit)
                ).scalars()
            )
            vectors = [_from_blob(r.embedding, dim) for r in rows]
            stale = [i for i, v in enumerate(vectors) if v is None]
            if stale:
                fresh = self.embedder.encode([rows[i].text for i in stale])
                for i, vector in zip(stale, fresh, strict=True):
                    vectors[i] = vector
                    rows[i].embedding = _to_blob(vector)
            return [
                FactVector(r.id, r.user_id, r.category, r.key, v)
                for r, v in zip(rows, vectors, strict=True)
                if v is not None
            ]

    def mark_all_unindexed(self) -> None:
        """The index lost vectors (a Chroma server that came back empty): index them all."""
        with self.db.session() as session:
            session.execute(update(MemoryFactRow).values(indexed=False))

    def edit(
        self, uid: str, fact_id: str, text: str, category: str | None, vector: np.ndarray
    ) -> FactVector | None:
        """Rewrite one of this user's facts (its slot stays); None if it is not theirs."""
        with self.db.session() as session:
            row = session.execute(
                select(MemoryFactRow).where(
                    MemoryFactRow.id == fact_id, MemoryFactRow.user_id == uid
                )
            ).scalar_one_or_none()
            if row is None:
                return None
            row.text = text
            if category is not None:
                if category not in MEMORY_CATEGORIES:
                    raise ValueError(f"unknown memory category {category!r}")
                if row.key == row.category:  # a multi-valued slot is named after its category
                    row.key = category
                row.category = category
            row.embedding = _to_blob(vector)
            row.indexed = False
            row.updated_at = utcnow()
            session.flush()
            return FactVector(row.id, uid, row.category, row.key, vector)

    def fact(self, uid: str, fact_id: str) -> MemoryFact | None:
        with self.db.session() as session:
            row = session.execute(
                select(MemoryFactRow).where(
                    MemoryFactRow.id == fact_id, MemoryFactRow.user_id == uid
                )
            ).scalar_one_or_none()
            return None if row is None else _fact(row)

    def delete(self, uid: str, fact_id: str) -> bool:
        """Delete one of this user's facts and the earlier values it replaced; False if it
        is not theirs."""
        with self.db.session() as session:
            result = session.execute(
                delete(MemoryFactRow).where(
                    MemoryFactRow.id == fact_id, MemoryFactRow.user_id == uid
                )
            )
            if result.rowcount > 0:
                session.execute(
                    delete(MemoryFactHistoryRow).where(
                        MemoryFactHistoryRow.user_id == uid,
                        MemoryFactHistoryRow.replaced_by == fact_id,
                    )
                )
            return result.rowcount > 0

    def purge(self, uid: str) -> int:
        """Delete every fact (and history) of a user id, even one whose user is deleted."""
        with self.db.session() as session:
            result = session.execute(delete(MemoryFactRow).where(MemoryFactRow.user_id == uid))
            session.execute(delete(MemoryFactHistoryRow).where(MemoryFactHistoryRow.user_id == uid))
            return int(result.rowcount)

    def history(self, uid: str) -> list[MemoryFactHistory]:
        """Earlier values of this user's one-valued slots, most recently replaced first."""
        with self.db.session() as session:
            self._user_enabled(session, uid)
            rows = session.execute(
                select(MemoryFactHistoryRow)
                .where(MemoryFactHistoryRow.user_id == uid)
                .order_by(MemoryFactHistoryRow.replaced_at.desc(), MemoryFactHistoryRow.id)
            ).scalars()
            return [
                MemoryFactHistory(
                    r.id,
                    r.user_id,
                    r.replaced_by,
                    r.category,
                    r.key,
                    r.text,
                    r.created_at,
                    r.replaced_at,
                )
                for r in rows
            ]

    # ------------------------------------------------------------------ reads

    def list_facts(self, uid: str) -> list[MemoryFact]:
        """All facts of this user, newest first (also with memory off)."""
        with self.db.session() as session:
            self._user_enabled(session, uid)
            rows = session.execute(
                select(MemoryFactRow)
                .where(MemoryFactRow.user_id == uid)
                .order_by(MemoryFactRow.updated_at.desc(), MemoryFactRow.id)
            ).scalars()
            return [_fact(r) for r in rows]

    def recall_ids(self, uid: str) -> list[str]:
        """The ids of this user's facts; [] when memory is off for them."""
        with self.db.session() as session:
            if not self._user_enabled(session, uid):
                return []
            return list(
                session.execute(
                    select(MemoryFactRow.id).where(MemoryFactRow.user_id == uid)
                ).scalars()
            )

    def vectors(self, uid: str, ids: list[str]) -> dict[str, FactVector]:
        """The vectors kept in SQLite for these ids of this user (a fallback for the index)."""
        dim = self.embedder.dim
        out: dict[str, FactVector] = {}
        with self.db.session() as session:
            for start in range(0, len(ids), _BATCH):
                rows = session.execute(
                    select(
                        MemoryFactRow.id,
                        MemoryFactRow.category,
                        MemoryFactRow.key,
                        MemoryFactRow.embedding,
                    ).where(
                        MemoryFactRow.user_id == uid,
                        MemoryFactRow.id.in_(ids[start : start + _BATCH]),
                    )
                )
                for fid, category, key, blob in rows:
                    vector = _from_blob(blob, dim)
                    if vector is not None:
                        out[fid] = FactVector(fid, uid, category, key, vector)
        return out

    def load_owned(self, uid: str, ordered_ids: list[str]) -> list[MemoryFact]:
        """The facts for these ids that belong to `uid`, in the given order."""
        if not ordered_ids:
            return []
        with self.db.session() as session:
            rows = session.execute(
                select(MemoryFactRow).where(
                    MemoryFactRow.user_id == uid, MemoryFactRow.id.in_(ordered_ids)
                )
            ).scalars()
            by_id = {r.id: _fact(r) for r in rows}
        return [by_id[i] for i in ordered_ids if i in by_id]

    def profile_facts(self, uid: str, max_facts: int) -> list[MemoryFact]:
        """Up to `max_facts` facts, by category rank then newest; [] when memory is off."""
        with self.db.session() as session:
            if not self._user_enabled(session, uid):
                return []
            rows = session.execute(
                select(MemoryFactRow).where(MemoryFactRow.user_id == uid)
            ).scalars()
            facts = [_fact(r) for r in rows]
        facts.sort(key=lambda f: f.updated_at, reverse=True)
        facts.sort(key=lambda f: _CATEGORY_RANK.get(f.category, len(_CATEGORY_RANK)))
        return facts[:max_facts]

    # ------------------------------------------------------------------ maintenance

    def index_all(self, add: Callable[[Sequence[FactVector]], None]) -> int:
        """Feed every fact's vector to `add` in batches, re-embedding missing vectors.

        A batch is marked indexed in the same transaction that `add` runs in, so a failed
        `add` leaves it unmarked. Returns the number of facts fed.
        """
        dim = self.embedder.dim
        total, last_id = 0, ""
        while True:
            with self.db.session() as session:
                rows = session.execute(
                    select(MemoryFactRow)
                    .options(undefer(MemoryFactRow.embedding))
                    .where(MemoryFactRow.id > last_id)
                    .order_by(MemoryFactRow.id)
                    .limit(_BATCH)
                ).scalars()
                batch = list(rows)
                if not batch:
                    return total
                vectors = [_from_blob(r.embedding, dim) for r in batch]
                stale = [i for i, v in enumerate(vectors) if v is None]
                if stale:
                    fresh = self.embedder.encode([batch[i].text for i in stale])
                    for i, vector in zip(stale, fresh, strict=True):
                        vectors[i] = vector
                        batch[i].embedding = _to_blob(vector)
                add(
                    [
                        FactVector(r.id, r.user_id, r.category, r.key, v)
                        for r, v in zip(batch, vectors, strict=True)
                        if v is not None
                    ]
                )
                for row in batch:
                    row.indexed = True
                last_id = batch[-1].id
                total += len(batch)
