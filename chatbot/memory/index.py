"""The vector index: one Chroma collection of every user's fact vectors, and its recovery.

Chroma is optional at run time. Any Chroma fault is logged, the client is dropped and the
next use after `retry_interval_s` reconnects; meanwhile reads answer None and the caller
falls back to the database. Deletions that fail are kept and retried on the next
connection, and every successful connection calls `on_connect` (the service re-indexes what
was written meanwhile). A Chroma server's requests time out after `timeout_s`, so a hung
server costs a chat turn that long at most. Vectors always come from the project's
`Embedder`: the collection has no embedding function, since Chroma's default one
downloads a model.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chatbot.memory.facts import FactVector
from core.chroma_client import open_chroma

__all__ = ["VectorIndex"]

log = logging.getLogger(__name__)


class VectorIndex:
    """The Chroma collection behind recall; see the module docstring."""

    def __init__(
        self,
        *,
        chroma_path: Path | None,
        chroma_url: str | None,
        collection_name: str,
        retry_interval_s: float,
        timeout_s: float = 10.0,
        on_connect: Callable[[], None] | None = None,
    ):
        if chroma_path is None and not chroma_url:
            raise ValueError("MemoryService needs chroma_path or chroma_url")
        self.chroma_path = Path(chroma_path) if chroma_path is not None else None
        self.chroma_url = chroma_url or None
        self.collection_name = collection_name
        self.retry_interval_s = retry_interval_s
        self.timeout_s = timeout_s
        self.on_connect = on_connect
        self._client: Any = None
        self._collection: Any = None
        self._retry_at = 0.0
        self._lock = threading.RLock()
        # Chroma deletions that failed; retried on the next successful connection.
        self._pending_deletes: set[str] = set()
        self._pending_user_wipes: set[str] = set()

    # ------------------------------------------------------------------ connection

    def _connect(self) -> Any:
        return open_chroma(path=self.chroma_path, url=self.chroma_url, timeout_s=self.timeout_s)

    def _open_collection(self, client: Any) -> Any:
        # embedding_function=None: we always pass MiniLM vectors; Chroma's default downloads.
        return client.get_or_create_collection(
            self.collection_name,
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine"}},
        )

    def collection(self) -> Any:
        """The Chroma collection, or None while Chroma is failing (retried after a pause)."""
        with self._lock:
            if self._collection is not None:
                return self._collection
            if time.monotonic() < self._retry_at:
                return None
            try:
                client = self._connect()
                collection = self._open_collection(client)
            except Exception as exc:  # any Chroma fault: memory degrades, chat goes on
                self._failed(exc, "connect")
                return None
            self._client, self._collection = client, collection
            self._flush_pending(collection)
        log.info("memory index (Chroma) connected")
        if self.on_connect is not None:
            self.on_connect()
        return collection

    def _failed(self, exc: BaseException, during: str) -> None:
        log.warning(
            "memory index (Chroma) failed during %s: %s; recall uses the database alone until "
            "it is back",
            during,
            exc,
        )
        with self._lock:
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

    def count(self) -> int | None:
        """How many vectors the collection holds; None while Chroma is failing."""
        collection = self.collection()
        if collection is None:
            return None
        try:
            return int(collection.count())
        except Exception as exc:  # reported as unavailable, never raised
            self._failed(exc, "count")
            return None

    def available(self) -> bool:
        """Whether Chroma answers now (for health checks)."""
        collection = self.collection()
        if collection is None:
            return False
        try:
            collection.count()
        except Exception as exc:  # reported as unavailable, never raised
            self._failed(exc, "health check")
            return False
        return True

    # ------------------------------------------------------------------ writes

    def upsert(self, rows: Sequence[FactVector]) -> bool:
        """Index these vectors; False when Chroma is unavailable or the write failed."""
        if not rows:
            return True
        collection = self.collection()
        if collection is None:
            return False
        try:
            _add(collection.upsert, rows)
        except Exception as exc:  # the facts are safe in SQLite; healed on a later recall
            self._failed(exc, "write")
            return False
        return True

    def remove(self, user_id: str, ids: Iterable[str] = (), *, everything: bool = False) -> None:
        """Delete these vectors (or all of the user's); on failure they stay pending."""
        ids = list(ids)
        if not ids and not everything:
            return
        collection = self.collection()
        try:
            if collection is None:
                raise RuntimeError("Chroma is unavailable")
            if everything:
                collection.delete(where={"user_id": user_id})
            else:
                collection.delete(ids=ids, where={"user_id": user_id})
        except Exception as exc:  # retried later; never returned meanwhile (SQLite is checked)
            if collection is not None:
                self._failed(exc, "delete")
            log.warning("memory vectors of a user are pending deletion from Chroma")
            if everything:
                self._pending_user_wipes.add(user_id)
            else:
                self._pending_deletes.update(ids)

    # ------------------------------------------------------------------ reads

    def vectors(self, uid: str, ids: list[str]) -> dict[str, np.ndarray] | None:
        """The indexed vectors of these ids owned by `uid`; None when Chroma fails."""
        collection = self.collection()
        if collection is None:
            return None
        try:
            got = collection.get(
                ids=ids, where={"user_id": uid}, include=["embeddings", "metadatas"]
            )
        except Exception as exc:  # the caller degrades to the vectors kept in SQLite
            self._failed(exc, "recall")
            return None
        return {
            fid: np.asarray(emb, dtype=np.float32)
            for fid, emb, meta in zip(got["ids"], got["embeddings"], got["metadatas"], strict=True)
            if meta and meta.get("user_id") == uid
        }

    def nearest(
        self, uid: str, owned: set[str], vector: np.ndarray, top_k: int
    ) -> list[str] | None:
        """Chroma's filtered ANN answer, owned ids only; None when Chroma fails."""
        collection = self.collection()
        if collection is None:
            return None
        try:
            result = collection.query(
                query_embeddings=[vector],
                n_results=top_k * 2,
                where={"user_id": uid},
                include=["metadatas", "distances"],
            )
        except Exception as exc:  # the caller degrades to the vectors kept in SQLite
            self._failed(exc, "recall")
            return None
        return [
            fid
            for fid, meta in zip(result["ids"][0], result["metadatas"][0], strict=True)
            if fid in owned and meta and meta.get("user_id") == uid
        ][:top_k]

    # ------------------------------------------------------------------ maintenance

    def rebuild(self, fill: Callable[[Callable[[Sequence[FactVector]], None]], int]) -> int:
        """Recreate the collection and `fill` it (given an add function); returns its count.

        Meanwhile this index answers None. Chroma's embedded mode is not multi-process safe:
        rebuild a `PersistentClient` dir while the app is stopped.
        """
        with self._lock:
            self._drop_client()
            self._retry_at = float("inf")
        try:
            client, collection = self._recreate()
            count = fill(lambda rows: _add(collection.add, rows))
        finally:
            with self._lock:
                self._retry_at = 0.0
        with self._lock:
            self._client, self._collection = client, collection
            # Deletions made while rebuilding may have hit already-indexed batches.
            self._flush_pending(collection)
        return count

    def _recreate(self) -> tuple[Any, Any]:
        """A client and an empty collection; an unusable local Chroma dir is recreated."""
        try:
            client = self._connect()
            try:
                client.delete_collection(self.collection_name)
            except Exception as exc:  # absent collection: nothing to drop
                log.debug("no memory collection to drop: %s", exc)
            return client, self._open_collection(client)
        except Exception as exc:
            if self.chroma_path is None or not _looks_like_chroma_dir(self.chroma_path):
                raise
            log.warning("Chroma dir %s unusable (%s); recreating it", self.chroma_path, exc)
            _drop_client_cache(self.chroma_path)
            shutil.rmtree(self.chroma_path)
            client = self._connect()
            return client, self._open_collection(client)

    def close(self) -> None:
        with self._lock:
            self._drop_client()


def _add(method: Callable[..., Any], rows: Sequence[FactVector]) -> None:
    """`collection.add` or `.upsert` of these rows, with the metadata recall filters on."""
    method(
        ids=[r.fact_id for r in rows],
        embeddings=np.stack([r.vector for r in rows]).astype(np.float32),
        metadatas=[{"user_id": r.user_id, "category": r.category, "key": r.key} for r in rows],
    )


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
