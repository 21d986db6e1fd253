"""`MemoryService`: the one way to read or write a user's memory (see the package docstring).

A thin facade over the fact store (SQLite) and the vector index (Chroma): it extracts
facts, ranks them for a query and renders them for the prompt.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chatbot.memory.facts import (
    FactStore,
    FactVector,
    MemoryFact,
    MemoryFactHistory,
    require_user_id,
)
from chatbot.memory.index import VectorIndex
from core.embeddings import Embedder
from core.memory_extract import (
    ExtractedFact,
    FactExtractor,
    LLMExtractor,
    RulesExtractor,
    normalise_key,
)
from core.prompting import load_prompt
from core.settings import Settings
from core.types import ChatModel
from storage.db import Database
from storage.memory_models import DEFAULT_COLLECTION, MEMORY_CATEGORIES

__all__ = ["MemoryService", "render_profile"]

log = logging.getLogger(__name__)

_MAX_MESSAGE_CHARS = 4000
_CATCH_UP_BATCH = 500


def _approx_tokens(text: str) -> int:
    return len(text) // 4 + 1


def _quote(statement: str) -> str:
    # A JSON string on one line; <, > escaped so a fact can never close the memory tags.
    return json.dumps(statement, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("<", "‹").replace(">", "›")


def render_profile(facts: Sequence[MemoryFact]) -> str:
    """One "- The user ..." line per fact (angle brackets defused: it goes into prompts)."""
    return "\n".join(f"- {_one_line(f.statement)}" for f in facts)


class MemoryService:
    """The only way to read or write a user's memory; see the package docstring."""

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
        timeout_s: float = 10.0,
    ):
        self.index = VectorIndex(
            chroma_path=chroma_path,
            chroma_url=chroma_url,
            collection_name=collection_name,
            retry_interval_s=retry_interval_s,
            timeout_s=timeout_s,
            on_connect=self._start_catch_up,
        )
        self.facts = FactStore(db, embedder, dedup_threshold=dedup_threshold, enabled=enabled)
        self.db = db
        self.embedder = embedder
        self.extractor: FactExtractor = extractor or RulesExtractor(embedder)
        self.top_k = top_k
        self.token_budget = token_budget
        self.count_tokens = count_tokens or _approx_tokens
        self.ann_min_facts = ann_min_facts
        # One writer at a time, so the index follows SQLite's order of writes.
        self._write_lock = threading.Lock()
        self._catch_up: threading.Thread | None = None

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
            retry_interval_s=mem.retry_interval_s,
            timeout_s=mem.chroma_timeout_s,
        )

    # Settings held by the two parts, readable here as before the split.
    @property
    def chroma_path(self) -> Path | None:
        return self.index.chroma_path

    @property
    def chroma_url(self) -> str | None:
        return self.index.chroma_url

    @property
    def collection_name(self) -> str:
        return self.index.collection_name

    @property
    def retry_interval_s(self) -> float:
        return self.index.retry_interval_s

    @property
    def dedup_threshold(self) -> float:
        return self.facts.dedup_threshold

    @property
    def enabled(self) -> bool:
        return self.facts.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.facts.enabled = value

    # ------------------------------------------------------------------ index

    def _index(self) -> Any:
        """The Chroma collection, or None while Chroma is failing (for tests and benches)."""
        return self.index.collection()

    def index_available(self) -> bool:
        """Whether Chroma answers now (for health checks)."""
        return self.index.available()

    # ------------------------------------------------------------------ users

    def is_enabled(self, user_id: str) -> bool:
        """Memory on for this user (and globally)."""
        return self.facts.is_enabled(require_user_id(user_id))

    def set_enabled(self, user_id: str, enabled: bool) -> None:
        """Off stops extraction and recall at once; stored facts stay until deleted."""
        self.facts.set_enabled(require_user_id(user_id), enabled)

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
        uid = require_user_id(user_id)
        if not self.facts.is_enabled(uid):
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
        uid = require_user_id(user_id)
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
        self.facts.is_enabled(uid)  # an unknown user fails closed
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
        with self._write_lock:
            stored = self.facts.store(uid, extracted, vectors, message_id, conversation_id)
            # Committed: the facts are acknowledged. The index follows, best effort.
            self.index.remove(uid, stored.removed)
            self._index_rows(stored.vectors)
        return stored.facts

    def _index_rows(self, rows: Sequence[FactVector]) -> None:
        if rows and self.index.upsert(rows):
            self.facts.mark_indexed([r.fact_id for r in rows])

    def edit_fact(
        self, user_id: str, fact_id: str, text: str, *, category: str | None = None
    ) -> MemoryFact | None:
        """Rewrite one of this user's facts (typed by the user) in SQLite and Chroma; None
        if it is not theirs. Its id and slot stay; the vector follows the new text."""
        uid = require_user_id(user_id)
        clean = " ".join((text or "").split())[:500]
        if not clean:
            raise ValueError("a memory fact needs some text")
        vector = self.embedder.encode([clean])[0]
        with self._write_lock:
            row = self.facts.edit(uid, fact_id, clean, category, vector)
            if row is None:
                return None
            self._index_rows([row])
        return self.facts.fact(uid, fact_id)

    def delete_fact(self, user_id: str, fact_id: str) -> bool:
        """Delete one of this user's facts from SQLite and Chroma; False if not theirs."""
        uid = require_user_id(user_id)
        with self._write_lock:
            deleted = self.facts.delete(uid, fact_id)
            if deleted:
                self.index.remove(uid, [fact_id])
        return deleted

    def forget_all(self, user_id: str) -> int:
        """Delete every fact of this (existing) user; returns how many were deleted."""
        uid = require_user_id(user_id)
        self.facts.is_enabled(uid)  # an unknown user fails closed
        return self.purge_user(uid)

    def purge_user(self, user_id: str) -> int:
        """Right to erasure: facts and vectors of a user id, even one already deleted."""
        uid = require_user_id(user_id)
        with self._write_lock:
            count = self.facts.purge(uid)
            self.index.remove(uid, everything=True)
        return count

    # ------------------------------------------------------------------ reads

    def list_facts(self, user_id: str) -> list[MemoryFact]:
        """All facts of this user, newest first (works with memory off, for the panel)."""
        return self.facts.list_facts(require_user_id(user_id))

    def history(self, user_id: str) -> list[MemoryFactHistory]:
        """Earlier values of one-valued slots that newer facts replaced, newest first."""
        return self.facts.history(require_user_id(user_id))

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
        uid = require_user_id(user_id)
        top_k = self.top_k if top_k is None else top_k
        budget = self.token_budget if token_budget is None else token_budget
        ids = self.facts.recall_ids(uid)
        if not ids or top_k <= 0 or (not (query or "").strip() and query_vector is None):
            return []
        vector = query_vector if query_vector is not None else self.embedder.encode([query])[0]
        ranked = self._rank(uid, ids, np.asarray(vector, dtype=np.float32), top_k)
        facts = self.facts.load_owned(uid, ranked)
        return self._within_budget(facts, budget)

    def _rank(self, uid: str, ids: list[str], vector: np.ndarray, top_k: int) -> list[str]:
        """Exact ranking of the user's vectors; Chroma's ANN for users with many facts.

        Vectors missing from Chroma come from SQLite and are re-indexed while Chroma works.
        """
        indexed: dict[str, np.ndarray] | None
        if len(ids) >= self.ann_min_facts:
            ranked = self.index.nearest(uid, set(ids), vector, top_k)
            if ranked is not None:
                return ranked
            indexed = None
        else:
            indexed = self.index.vectors(uid, ids)
        vectors = dict(indexed or {})
        missing = [i for i in ids if i not in vectors]
        if missing:
            healed = self.facts.vectors(uid, missing)
            vectors.update({fid: row.vector for fid, row in healed.items()})
            if indexed is not None and healed:
                log.info("re-indexing %d memory facts missing from Chroma", len(healed))
                self._index_rows(list(healed.values()))
        if not vectors:
            return []
        order = list(vectors)
        scores = np.stack([vectors[i] for i in order]) @ vector
        best = np.argsort(-scores, kind="stable")[:top_k]
        return [order[i] for i in best]

    def _within_budget(self, facts: Sequence[MemoryFact], budget: int) -> list[MemoryFact]:
        out, used = [], 0
        for fact in facts:
            cost = self.count_tokens(_quote(fact.statement))
            if used + cost <= budget:
                out.append(fact)
                used += cost
        return out

    def profile(self, user_id: str, *, max_facts: int = 8, token_budget: int | None = None) -> str:
        """A short profile, one "- The user ..." line per fact; "" when empty or memory off.

        Used for the greeting of a new conversation and as the critic's user background.
        """
        facts = self.profile_facts(user_id, max_facts=max_facts)
        if token_budget is not None:
            facts = self._within_budget(facts, token_budget)
        return render_profile(facts)

    def profile_facts(self, user_id: str, *, max_facts: int = 8) -> list[MemoryFact]:
        """The profile's facts, by category rank then newest; [] when memory is off."""
        return self.facts.profile_facts(require_user_id(user_id), max_facts)

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
        uid = require_user_id(user_id)
        budget = self.token_budget if token_budget is None else token_budget
        relevant = self.recall(
            uid, query, top_k=top_k, token_budget=budget, query_vector=query_vector
        )
        seen = {f.id for f in relevant}
        extra = [f for f in self.facts.profile_facts(uid, max_profile_facts) if f.id not in seen]
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
        return self.index.rebuild(self.facts.index_all)

    def catch_up(self) -> int:
        """Index what the database has and Chroma lacks; returns how many facts were fed.

        Runs after every (re)connection to Chroma, so no one has to rebuild by hand: facts
        written while Chroma was down are still unmarked, and a collection holding fewer
        vectors than the database marks as indexed (a server that came back empty) gets
        every fact again. Each batch is read, indexed and marked under the write lock, so
        a deletion never interleaves; replicas catching up together only repeat upserts.
        """
        have = self.index.count()
        if have is None:
            return 0
        if have < self.facts.count_indexed():
            log.warning("memory index holds %d vectors, fewer than indexed; re-indexing all", have)
            self.facts.mark_all_unindexed()
        fed, last_id = 0, ""
        while True:
            with self._write_lock:
                rows = self.facts.pending(last_id, _CATCH_UP_BATCH)
                if not rows or not self.index.upsert(rows):
                    break
                self.facts.mark_indexed([r.fact_id for r in rows])
            fed += len(rows)
            last_id = rows[-1].fact_id
        if fed:
            log.info("memory index caught up: %d facts indexed from the database", fed)
        return fed

    def _start_catch_up(self) -> None:
        """Catch up in the background: a reconnect found by a chat turn must not slow it."""
        if self._catch_up is not None and self._catch_up.is_alive():
            return
        self._catch_up = threading.Thread(
            target=self._run_catch_up, name="memory-catch-up", daemon=True
        )
        self._catch_up.start()

    def _run_catch_up(self) -> None:
        try:
            self.catch_up()
        except Exception as exc:  # the next reconnect retries; recall heals per user meanwhile
            log.warning("memory index catch-up failed: %s", exc)

    def wait_caught_up(self, timeout_s: float = 60.0) -> None:
        """Wait for a running catch-up (CLIs before exiting, tests)."""
        thread = self._catch_up
        if thread is not None:
            thread.join(timeout_s)

    def close(self) -> None:
        self.wait_caught_up()
        self.index.close()
