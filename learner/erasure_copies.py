"""Erasure beyond the database: exports, console download copies and Chroma's own log.

- **Exports** (`exports_dir/<id>/`, scrubbed or not): an export that holds any of the
  user's conversations is deleted whole, every format, with its private record in
  `runs_dir/exports/`. Parquet files, HF datasets and their zips can't be edited in place
  safely, and an export is cheap to make again. Which exports hold the user is read from
  the private record (salted hashes of the exported users, next to the salt); an export
  without such a record is judged by its `dialogues.jsonl`, and deleted if it has none.
- **Console download copies** (`console_downloads_dir`): every pending copy is deleted,
  whoever's export it is; their links answer 404 and the operator exports again.
- **Chroma**: deleting vectors leaves their metadata (the user id, the fact's key) in
  Chroma's write-ahead log, the `embeddings_queue` table, until the vector segment catches
  up. The collection is rebuilt from what it still holds (dropping a collection drops its
  log), segment directories no collection uses are removed, and the file is vacuumed.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from learner.export.reader import hash_user_id
from learner.export.records import FORMAT_FILES

__all__ = ["compact_chroma", "purge_downloads", "purge_exports"]

log = logging.getLogger(__name__)

_ADD_BATCH = 1000


def _holds_user(
    export_dir: Path, record: dict[str, Any] | None, user_id: str, conv_ids: set[str]
) -> bool:
    if record is not None and "user_hashes" in record and record.get("salt"):
        return hash_user_id(user_id, record["salt"]) in set(record["user_hashes"])
    jsonl = export_dir / FORMAT_FILES["jsonl"]
    if not jsonl.is_file():
        return True  # no way to tell: keep no copy that might hold the user
    with jsonl.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                meta = json.loads(line).get("meta", {})
            except (ValueError, AttributeError):
                return True
            if isinstance(meta, dict) and meta.get("id") in conv_ids:
                return True
    return False


def purge_exports(exports_dir: Path, runs_dir: Path, user_id: str, conv_ids: set[str]) -> list[str]:
    """Delete every export holding the user; returns the deleted export ids."""
    exports_dir = Path(exports_dir)
    if not exports_dir.is_dir():
        return []
    deleted = []
    for export_dir in sorted(exports_dir.iterdir()):
        if export_dir.is_symlink() or not export_dir.is_dir():
            continue
        record_path = Path(runs_dir) / "exports" / f"{export_dir.name}.json"
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if _holds_user(export_dir, record, user_id, conv_ids):
            shutil.rmtree(export_dir)
            record_path.unlink(missing_ok=True)
            deleted.append(export_dir.name)
    return deleted


def purge_downloads(downloads_dir: Path) -> int:
    """Delete every pending console download copy; returns how many files went."""
    root = Path(downloads_dir)
    if not root.is_dir():
        return 0
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        path.unlink(missing_ok=True)
    return len(files)


def _queued_for(db_path: Path, user_id: str) -> int:
    con = sqlite3.connect(db_path)
    try:
        return con.execute(
            "SELECT count(*) FROM embeddings_queue WHERE json_extract(metadata, '$.user_id') = ?",
            (user_id,),
        ).fetchone()[0]
    except sqlite3.Error as exc:  # another Chroma schema: rebuild to be safe
        log.warning("could not read Chroma's log: %s", exc)
        return 1
    finally:
        con.close()


def _rebuild(client: Any, name: str) -> int:
    collection = client.get_collection(name)
    configuration = collection.configuration
    kept = collection.get(include=["embeddings", "metadatas", "documents"])
    client.delete_collection(name)
    fresh = client.create_collection(
        name, configuration=configuration, metadata=collection.metadata, embedding_function=None
    )
    ids = kept["ids"]
    for start in range(0, len(ids), _ADD_BATCH):
        part = slice(start, start + _ADD_BATCH)
        fresh.add(
            ids=ids[part],
            embeddings=kept["embeddings"][part],
            metadatas=kept["metadatas"][part],
            documents=kept["documents"][part] if any(kept["documents"][part]) else None,
        )
    return len(ids)


def _remove_orphan_segments(chroma_dir: Path, db_path: Path) -> int:
    con = sqlite3.connect(db_path)
    try:
        live = {row[0] for row in con.execute("SELECT id FROM segments")}
    finally:
        con.close()
    removed = 0
    for child in chroma_dir.iterdir():
        try:
            uuid.UUID(child.name)
        except ValueError:
            continue
        if child.is_dir() and child.name not in live:
            shutil.rmtree(child)
            removed += 1
    return removed


def compact_chroma(chroma_dir: Path, collection: str, user_id: str) -> bool:
    """Rebuild `collection` if Chroma's log still names the user; True if it did."""
    chroma_dir = Path(chroma_dir)
    db_path = chroma_dir / "chroma.sqlite3"
    if not db_path.is_file() or not _queued_for(db_path, user_id):
        return False
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    client = chromadb.PersistentClient(
        path=str(chroma_dir), settings=ChromaSettings(anonymized_telemetry=False)
    )
    try:
        kept = _rebuild(client, collection)
    finally:
        client.close()
    orphans = _remove_orphan_segments(chroma_dir, db_path)
    con = sqlite3.connect(db_path)
    try:
        con.execute("VACUUM")
    finally:
        con.close()
    log.info(
        "rebuilt the Chroma collection (%d vectors kept, %d old segments removed)", kept, orphans
    )
    return True
