"""Per-user background memory: SQLite holds the facts (the truth), Chroma the vector index.

Every read and write is scoped to one user id by this code; a missing or unknown user id
fails closed (`MemoryScopeError`). Chroma is optional at run time: when it fails, the
service logs a warning and carries on with the vectors kept in SQLite, so a chat turn
never fails because of memory. Writes commit to SQLite first; `rebuild()` recreates the
Chroma index from SQLite.

Retrieval: a user's fact ids come from SQLite; their vectors are fetched from Chroma by
id *and* `where={"user_id": uid}`, then ranked exactly with numpy. Per-user fact sets are
small, and an exact scan of them is faster than a filtered HNSW search over every user's
vectors (which Chroma answers slowly at 1% selectivity). Users with more than
`ann_min_facts` facts use Chroma's filtered ANN query instead. Either way, results are
re-checked against SQLite ownership before they are returned.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, undefer

from core.embeddings import Embedder
from core.memory_extract import (
    SINGLE_VALUED_KEYS,
    ExtractedFact,
    FactExtractor,
    LLMExtractor,
    RulesExtractor,
    normalise_key,
)
from core.prompting import load_prompt
from storage.memory_models import DEFAULT_COLLECTION, MEMORY_CATEGORIES, MemoryFactRow
from storage.models import User, utcnow

if TYPE_CHECKING:
    from datetime import datetime

    from core.settings import Settings
    from core.types import ChatModel
    from storage.db import Database

__all__ = ["DEFAULT_COLLECTION", "MemoryFact", "MemoryScopeError", "MemoryService"]

log = logging.getLogger(__name__)

_MAX_MESSAGE_CHARS = 4000
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


def _approx_tokens(text: str) -> int:
    return len(text) // 4 + 1


def _quote(statement: str) -> str:
    # A JSON string on one line; <, > escaped so a fact can never close the memory tags.
    return json.dumps(statement, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")


def _require_user_id(user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise MemoryScopeError("a memory operation needs the user id (got none)")
    return user_id


class MemoryService:
    """The only way to read or write a user's memory; see the module docstring."""

    def __init__(
        self,
        db: Database,
        embedder: Embedder,
        *,
        chroma_path: Path | None = None,
        chroma_url: str | None = None,
        extractor: FactExtractor | None = None,
        dedup_threshold: float = 0.85,
        top_k: int = 5,
        token_budget: int = 160,
        count_tokens: Callable[[str], int] | None = None,
        collection_name: str = DEFAULT_COLLECTION,
        enabled: bool = True,
        retry_interval_s: float = 30.0,
        ann_min_facts: int = 2000,
    ):
        if chroma_path is None and not chroma_url:
            raise ValueError("MemoryService needs chroma_path or chroma_url")
        if not 0.0 < dedup_threshold <= 1.0:
            raise ValueError("dedup_threshold must be in (0, 1]")
        self.db = db
        self.embedder = embedder
        self.chroma_path = Path(chroma_path) if chroma_path is not None else None
        self.chroma_url = chroma_url or None
        self.extractor: FactExtractor = extractor or RulesExtractor(embedder)
        self.dedup_threshold = dedup_threshold
        self.top_k = top_k
        self.token_budget = token_budget
        self.count_tokens = count_tokens or _approx_tokens
        self.collection_name = collection_name
        self.enabled = enabled
        self.retry_interval_s = retry_interval_s
        self.ann_min_facts = ann_min_facts
        self._client: Any = None
        self._collection: Any = None
        self._retry_at = 0.0
        self._index_lock = threading.RLock()
        self._write_lock = threading.Lock()
        # Chroma deletions that failed; retried on the next successful connection.
        self._pending_deletes: set[str] = set()
        self._pending_user_wipes: set[str] = set()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        db: Database,
        embedder: Embedder,
        *,
        llm: ChatModel | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> MemoryService:
        """Build from `settings.memory`. Pass `llm` only when a capable extraction model is
        configured; `extractor = "auto"` uses it when given and the rules otherwise."""
        mem = settings.memory
        rules = RulesExtractor(embedder)
        extractor: FactExtractor = rules
        if mem.extractor == "llm" or (mem.extractor == "auto" and llm is not None):
            if llm is None:
                log.warning("memory.extractor=llm but no LLM was given; using the rules")
            else:
                extractor = LLMExtractor(llm, fallback=rules)
        return cls(
            db,
            embedder,
            chroma_path=settings.chroma_dir,
            chroma_url=mem.chroma_url,
            extractor=extractor,
            dedup_threshold=mem.dedup_threshold,
            top_k=mem.top_k,
            token_budget=mem.token_budget,
            count_tokens=count_tokens,
            enabled=mem.enabled,
        )

    # ------------------------------------------------------------------ Chroma index

    def _connect(self) -> Any:
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        chroma_settings = ChromaSettings(anonymized_telemetry=False)
        if self.chroma_url:
            parts = urlsplit(self.chroma_url if "//" in self.chroma_url else f"//{self.chroma_url}")
            ssl = parts.scheme == "https"
            if not parts.hostname:
                raise ValueError(f"cannot parse the Chroma URL {self.chroma_url!r}")
            return chromadb.HttpClient(
                host=parts.hostname,
                port=parts.port or (443 if ssl else 8000),
                ssl=ssl,
                settings=chroma_settings,
            )
        assert self.chroma_path is not None
        self.chroma_path.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(self.chroma_path), settings=chroma_settings)

    def _open_collection(self, client: Any) -> Any:
        # embedding_function=None: we always pass MiniLM vectors; Chroma's default downloads.
        return client.get_or_create_collection(
            self.collection_name,
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine"}},
        )

    def _index(self) -> Any:
        """The Chroma collection, or None while Chroma is failing (retried after a pause)."""
        with self._index_lock:
            if self._collection is not None:
                return self._collection
            if time.monotonic() < self._retry_at:
                return None
            try:
                client = self._connect()
                collection = self._open_collection(client)
            except Exception as exc:  # any Chroma fault: memory degrades, chat goes on
                self._index_failed(exc, "connect")
                return None
            self._client, self._collection = client, collection
            self._flush_pending(collection)
            return collection

    def _index_failed(self, exc: BaseException, during: str) -> None:
        log.warning(
            "memory index (Chroma) failed during %s: %s; using SQLite only for now", during, exc
        )
        with self._index_lock:
            self._drop_client()
            self._retry_at = time.monotonic() + self.retry_interval_s

    def _drop_client(self) -> None:
        client, self._client, self._collection = self._client, None, None
        if client is not None and hasattr(client, "close"):
            try:
                client.close()
            except Exception as exc:  # closing a broken client may fail too
                log.debug("closing the Chroma client failed: %s", exc)

    def _flush_pending(self, collection: Any) -> None:
        try:
            if self._pending_deletes:
                collection.delete(ids=sorted(self._pending_deletes))
                self._pending_deletes.clear()
            for uid in sorted(self._pending_user_wipes):
                collection.delete(where={"user_id": uid})
                self._pending_user_wipes.discard(uid)
        except Exception as exc:  # left pending; rebuild() also clears them
            log.warning("retrying memory deletions in Chroma failed: %s", exc)

    def index_available(self) -> bool:
        """Whether Chroma answers now (for health checks)."""
        collection = self._index()
        if collection is None:
            return False
        try:
            collection.count()
        except Exception as exc:  # reported as unavailable, never raised
            self._index_failed(exc, "health check")
            return False
        return True

    def _index_rows(self, rows: Sequence[tuple[str, str, str, str, np.ndarray]]) -> bool:
        """Upsert (id, user_id, category, key, vector) rows; mark them indexed in SQLite."""
        if not rows:
            return True
        collection = self._index()
        if collection is None:
            return False
        try:
            collection.upsert(
                ids=[r[0] for r in rows],
                embeddings=np.stack([r[4] for r in rows]).astype(np.float32),
                metadatas=[{"user_id": r[1], "category": r[2], "key": r[3]} for r in rows],
            )
        except Exception as exc:  # the facts are safe in SQLite; healed on a later recall
            self._index_failed(exc, "write")
            return False
        with self.db.session() as session:
            session.execute(
                update(MemoryFactRow)
                .where(MemoryFactRow.id.in_([r[0] for r in rows]))
                .values(indexed=True)
            )
        return True

    def _unindex(self, user_id: str, ids: Iterable[str] = (), *, everything: bool = False) -> None:
        ids = list(ids)
        if not ids and not everything:
            return
        collection = self._index()
        try:
            if collection is None:
                raise RuntimeError("Chroma is unavailable")
            if everything:
                collection.delete(where={"user_id": user_id})
            else:
                collection.delete(ids=ids, where={"user_id": user_id})
        except Exception as exc:  # retried later; never returned meanwhile (SQLite is checked)
            if collection is not None:
                self._index_failed(exc, "delete")
            log.warning("memory vectors of a user are pending deletion from Chroma")
            if everything:
                self._pending_user_wipes.add(user_id)
            else:
                self._pending_deletes.update(ids)

    # ------------------------------------------------------------------ users

    def _user_enabled(self, session: Session, user_id: str) -> bool:
        enabled = session.execute(
            select(User.memory_enabled).where(User.id == user_id)
        ).scalar_one_or_none()
        if enabled is None:
            raise MemoryScopeError("unknown user id")
        return bool(enabled) and self.enabled

    def is_enabled(self, user_id: str) -> bool:
        """Memory on for this user (and globally)."""
        uid = _require_user_id(user_id)
        with self.db.session() as session:
            return self._user_enabled(session, uid)

    def set_enabled(self, user_id: str, enabled: bool) -> None:
        """Off stops extraction and recall at once; stored facts stay until deleted."""
        uid = _require_user_id(user_id)
        with self.db.session() as session:
            result = session.execute(
                update(User).where(User.id == uid).values(memory_enabled=bool(enabled))
            )
            if result.rowcount == 0:
                raise MemoryScopeError("unknown user id")

    # ------------------------------------------------------------------ writes

    def remember(
        self,
        user_id: str,
        text: str,
        *,
        message_id: str | None = None,
        conversation_id: str | None = None,
    ) -> list[MemoryFact]:
        """Extract background facts from one user message and store them (with dedup).

        Returns the facts stored or updated; [] when memory is off or nothing was found.
        A fact is acknowledged once this returns: it is committed to SQLite.
        """
        uid = _require_user_id(user_id)
        with self.db.session() as session:
            if not self._user_enabled(session, uid):
                return []
        message = (text or "")[:_MAX_MESSAGE_CHARS]
        if not message.strip():
            return []
        extracted = self.extractor.extract(message)
        if not extracted:
            return []
        return self._store(uid, extracted, message_id, conversation_id)

    def add_fact(
        self,
        user_id: str,
        text: str,
        *,
        category: str = "other",
        key: str | None = None,
        message_id: str | None = None,
        conversation_id: str | None = None,
    ) -> MemoryFact:
        """Store one fact as given (e.g. typed by the user), with the same dedup rules."""
        fact = ExtractedFact(category, key or category, text)
        return self.add_facts(
            user_id, [fact], message_id=message_id, conversation_id=conversation_id
        )[0]

    def add_facts(
        self,
        user_id: str,
        facts: Sequence[ExtractedFact],
        *,
        message_id: str | None = None,
        conversation_id: str | None = None,
    ) -> list[MemoryFact]:
        """Store already-extracted facts (one embedding batch, one transaction), with dedup.

        Works with memory off too: it is an explicit write, not background extraction.
        """
        uid = _require_user_id(user_id)
        clean: list[ExtractedFact] = []
        for fact in facts:
            if fact.category not in MEMORY_CATEGORIES:
                raise ValueError(f"unknown memory category {fact.category!r}")
            text = " ".join((fact.text or "").split())
            if not text:
                raise ValueError("a memory fact needs some text")
            clean.append(
                ExtractedFact(
                    fact.category,
                    normalise_key(fact.key or fact.category, fact.category),
                    text[:500],
                    fact.vector if text == fact.text else None,
                )
            )
        with self.db.session() as session:
            self._user_enabled(session, uid)
        if not clean:
            return []
        return self._store(uid, clean, message_id, conversation_id)

    def _store(
        self,
        uid: str,
        extracted: Sequence[ExtractedFact],
        message_id: str | None,
        conversation_id: str | None,
    ) -> list[MemoryFact]:
        need = [i for i, f in enumerate(extracted) if f.vector is None]
        computed = self.embedder.encode([extracted[i].text for i in need]) if need else None
        vectors: list[np.ndarray] = []
        for i, fact in enumerate(extracted):
            if fact.vector is not None:
                vectors.append(np.asarray(fact.vector, dtype=np.float32))
            else:
                assert computed is not None
                vectors.append(computed[need.index(i)])
        dim = self.embedder.dim
        touched: dict[str, MemoryFactRow] = {}
        removed: list[str] = []
        with self._write_lock:
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
                to_index = [
                    (r.id, uid, r.category, r.key, _from_blob(r.embedding, dim))
                    for r in touched.values()
                ]
            # Committed: the facts are acknowledged. The index follows, best effort.
            self._unindex(uid, removed)
            self._index_rows([r for r in to_index if r[4] is not None])  # type: ignore[misc]
        return stored

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
        dropped: list[str] = []
        target = best if best is not None and best_sim > self.dedup_threshold else None
        if single:
            # A newer value of a one-valued slot contradicts (replaces) the older ones.
            for row in pool:
                if row is not target:
                    session.delete(row)
                    dropped.append(row.id)
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
        return target, dropped

    def delete_fact(self, user_id: str, fact_id: str) -> bool:
        """Delete one of this user's facts from SQLite and Chroma; False if not theirs."""
        uid = _require_user_id(user_id)
        with self._write_lock:
            with self.db.session() as session:
                result = session.execute(
                    delete(MemoryFactRow).where(
                        MemoryFactRow.id == fact_id, MemoryFactRow.user_id == uid
                    )
                )
                deleted = result.rowcount > 0
            if deleted:
                self._unindex(uid, [fact_id])
        return deleted

    def forget_all(self, user_id: str) -> int:
        """Delete every fact of this (existing) user; returns how many were deleted."""
        uid = _require_user_id(user_id)
        with self.db.session() as session:
            self._user_enabled(session, uid)
        return self.purge_user(uid)

    def purge_user(self, user_id: str) -> int:
        """Right to erasure: facts and vectors of a user id, even one already deleted."""
        uid = _require_user_id(user_id)
        with self._write_lock:
            with self.db.session() as session:
                result = session.execute(delete(MemoryFactRow).where(MemoryFactRow.user_id == uid))
                count = result.rowcount
            self._unindex(uid, everything=True)
        return int(count)

    # ------------------------------------------------------------------ reads

    def list_facts(self, user_id: str) -> list[MemoryFact]:
        """All facts of this user, newest first (works with memory off, for the panel)."""
        uid = _require_user_id(user_id)
        with self.db.session() as session:
            self._user_enabled(session, uid)
            rows = session.execute(
                select(MemoryFactRow)
                .where(MemoryFactRow.user_id == uid)
                .order_by(MemoryFactRow.updated_at.desc(), MemoryFactRow.id)
            ).scalars()
            return [_fact(r) for r in rows]

    def recall(
        self,
        user_id: str,
        query: str,
        *,
        top_k: int | None = None,
        token_budget: int | None = None,
        query_vector: np.ndarray | None = None,
    ) -> list[MemoryFact]:
        """The user's facts most relevant to `query`, best first, within the token budget
        (counted on each fact's `statement`). [] when memory is off."""
        uid = _require_user_id(user_id)
        top_k = self.top_k if top_k is None else top_k
        budget = self.token_budget if token_budget is None else token_budget
        with self.db.session() as session:
            if not self._user_enabled(session, uid):
                return []
            ids = list(
                session.execute(
                    select(MemoryFactRow.id).where(MemoryFactRow.user_id == uid)
                ).scalars()
            )
        if not ids or top_k <= 0 or (not (query or "").strip() and query_vector is None):
            return []
        vector = query_vector if query_vector is not None else self.embedder.encode([query])[0]
        ranked = self._rank(uid, ids, np.asarray(vector, dtype=np.float32), top_k)
        facts = self._load_owned(uid, ranked)
        return self._within_budget(facts, budget)

    def _rank(self, uid: str, ids: list[str], vector: np.ndarray, top_k: int) -> list[str]:
        collection = self._index()
        vectors: dict[str, np.ndarray] = {}
        if collection is not None:
            try:
                if len(ids) >= self.ann_min_facts:
                    return self._rank_ann(collection, uid, set(ids), vector, top_k)
                got = collection.get(
                    ids=ids, where={"user_id": uid}, include=["embeddings", "metadatas"]
                )
                for fid, emb, meta in zip(
                    got["ids"], got["embeddings"], got["metadatas"], strict=True
                ):
                    if meta and meta.get("user_id") == uid:
                        vectors[fid] = np.asarray(emb, dtype=np.float32)
            except Exception as exc:  # degrade to the vectors kept in SQLite
                self._index_failed(exc, "recall")
                collection = None
        missing = [i for i in ids if i not in vectors]
        if missing:
            healed = self._vectors_from_sqlite(uid, missing)
            vectors.update({fid: v for fid, (_c, _k, v) in healed.items()})
            if collection is not None and healed:
                log.info("re-indexing %d memory facts missing from Chroma", len(healed))
                self._index_rows([(fid, uid, c, k, v) for fid, (c, k, v) in healed.items()])
        if not vectors:
            return []
        order = list(vectors)
        scores = np.stack([vectors[i] for i in order]) @ vector
        best = np.argsort(-scores, kind="stable")[:top_k]
        return [order[i] for i in best]

    def _rank_ann(
        self, collection: Any, uid: str, owned: set[str], vector: np.ndarray, top_k: int
    ) -> list[str]:
        result = collection.query(
            query_embeddings=[vector],
            n_results=top_k * 2,
            where={"user_id": uid},
            include=["metadatas", "distances"],
        )
        return [
            fid
            for fid, meta in zip(result["ids"][0], result["metadatas"][0], strict=True)
            if fid in owned and meta and meta.get("user_id") == uid
        ][:top_k]

    def _vectors_from_sqlite(
        self, uid: str, ids: list[str]
    ) -> dict[str, tuple[str, str, np.ndarray]]:
        dim = self.embedder.dim
        out: dict[str, tuple[str, str, np.ndarray]] = {}
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
                        out[fid] = (category, key, vector)
        return out

    def _load_owned(self, uid: str, ordered_ids: list[str]) -> list[MemoryFact]:
        """The facts for these ids that belong to `uid` in SQLite, in the given order."""
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

    def _within_budget(self, facts: Sequence[MemoryFact], budget: int) -> list[MemoryFact]:
        out, used = [], 0
        for fact in facts:
            cost = self.count_tokens(_quote(fact.statement))
            if used + cost <= budget:
                out.append(fact)
                used += cost
        return out

    def _profile_facts(self, uid: str, max_facts: int) -> list[MemoryFact]:
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

    def profile(self, user_id: str, *, max_facts: int = 8, token_budget: int | None = None) -> str:
        """A short profile, one "- The user ..." line per fact; "" when empty or memory off.

        Used for the greeting of a new conversation and as the critic's user background.
        """
        uid = _require_user_id(user_id)
        facts = self._profile_facts(uid, max_facts)
        if token_budget is not None:
            facts = self._within_budget(facts, token_budget)
        return "\n".join(f"- {_one_line(f.statement)}" for f in facts)

    def context_block(
        self,
        user_id: str,
        query: str,
        *,
        top_k: int | None = None,
        token_budget: int | None = None,
        max_profile_facts: int = 8,
        query_vector: np.ndarray | None = None,
    ) -> str:
        """The memory text for the chatbot's system prompt; "" when there is none.

        The facts relevant to `query` come first, then profile facts, all within
        `token_budget` (fact lines only; the fixed framing adds about 80 tokens). Facts are
        quoted as data inside <user_memory> tags, framed as background, not instructions.
        """
        uid = _require_user_id(user_id)
        budget = self.token_budget if token_budget is None else token_budget
        relevant = self.recall(
            uid, query, top_k=top_k, token_budget=budget, query_vector=query_vector
        )
        seen = {f.id for f in relevant}
        extra = [f for f in self._profile_facts(uid, max_profile_facts) if f.id not in seen]
        facts = self._within_budget([*relevant, *extra], budget)
        if not facts:
            return ""
        lines = "\n".join(_quote(f.statement) for f in facts)
        return load_prompt("memory_context", "chatbot").fill(facts=lines).strip()

    # ------------------------------------------------------------------ maintenance

    def rebuild(self) -> int:
        """Recreate the Chroma index from SQLite; returns the number of facts indexed.

        Meanwhile recall in this process runs on SQLite only. Chroma's embedded mode is not
        multi-process safe: rebuild a `PersistentClient` dir while the app is stopped.
        """
        with self._index_lock:
            self._drop_client()
            self._retry_at = float("inf")
        try:
            try:
                client = self._connect()
                try:
                    client.delete_collection(self.collection_name)
                except Exception as exc:  # absent collection: nothing to drop
                    log.debug("no memory collection to drop: %s", exc)
                collection = self._open_collection(client)
            except Exception as exc:
                if self.chroma_path is None or not _looks_like_chroma_dir(self.chroma_path):
                    raise
                log.warning("Chroma dir %s unusable (%s); recreating it", self.chroma_path, exc)
                _drop_client_cache(self.chroma_path)
                shutil.rmtree(self.chroma_path)
                client = self._connect()
                collection = self._open_collection(client)
            count = self._reindex_all(collection)
        finally:
            with self._index_lock:
                self._retry_at = 0.0
        with self._index_lock:
            self._client, self._collection = client, collection
            # Deletions made while rebuilding may have hit already-indexed batches.
            self._flush_pending(collection)
        return count

    def _reindex_all(self, collection: Any) -> int:
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
                collection.add(
                    ids=[r.id for r in batch],
                    embeddings=np.stack(vectors).astype(np.float32),  # type: ignore[arg-type]
                    metadatas=[
                        {"user_id": r.user_id, "category": r.category, "key": r.key} for r in batch
                    ],
                )
                for row in batch:
                    row.indexed = True
                last_id = batch[-1].id
                total += len(batch)

    def close(self) -> None:
        with self._index_lock:
            self._drop_client()


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("<", "‹").replace(">", "›")


def _looks_like_chroma_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "chroma.sqlite3").exists() or not any(path.iterdir()))


def _drop_client_cache(path: Path) -> None:
    """Forget Chroma's cached in-process system for `path` before deleting the dir."""
    from chromadb.api.shared_system_client import SharedSystemClient

    system = SharedSystemClient._identifier_to_system.pop(str(path), None)
    SharedSystemClient._identifier_to_refcount.pop(str(path), None)
    if system is not None:
        try:
            system.stop()
        except Exception as exc:  # a broken system may not stop cleanly
            log.debug("stopping the cached Chroma system failed: %s", exc)
