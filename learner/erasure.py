"""Right to erasure: delete a user and everything learned from them.

Order: find the user's logged-learning example ids (needed to find training files and
adapters), delete memory (through `MemoryService.purge_user`, or the rows and the Chroma
vectors directly), delete the user's rows (conversations, messages, feedback, logged turns,
guard records) and the user, rewrite every training-set file under `runs_dir` without their
examples, flag every adapter whose manifest lists one of them, delete the copies outside
the database (exports holding the user, pending console downloads, Chroma's log: see
`learner.erasure_copies`), then fold and truncate the WAL and VACUUM, so no deleted page
survives in the database files (`secure_delete` is on; on PostgreSQL, VACUUM FULL
rewrites the erased tables).
Adapter weights cannot be "untrained": flagged adapters should be retired or retrained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.chroma_client import open_chroma
from learner.erasure_copies import compact_chroma, purge_downloads, purge_exports
from learner.logged import LOGGED_PREFIX, load_salt, user_hash
from learner.registry import AdapterRegistry
from storage.db import Database
from storage.logged_models import ErasureRow, GuardExclusionRow, LoggedTurnRow
from storage.memory_models import DEFAULT_COLLECTION, MemoryFactHistoryRow, MemoryFactRow
from storage.models import (
    Conversation,
    Feedback,
    LoginFailureRow,
    Message,
    RateWindowRow,
    User,
    WebSessionRow,
    limit_key,
)

__all__ = ["ErasureReport", "MemoryPurger", "erase_user", "find_user_id"]

log = logging.getLogger(__name__)


class MemoryPurger(Protocol):
    """The app's memory service, as far as erasure needs it (it lives in a higher layer)."""

    def purge_user(self, user_id: str) -> int: ...


@dataclass
class ErasureReport:
    user_hash: str
    conversations: int = 0
    messages: int = 0
    feedback: int = 0
    memory_facts: int = 0
    logged_turns: int = 0
    guard_records: int = 0
    training_rows_removed: int = 0
    training_files_rewritten: list[str] = field(default_factory=list)
    flagged_adapters: list[str] = field(default_factory=list)
    exports_deleted: list[str] = field(default_factory=list)
    download_copies_deleted: int = 0
    chroma_rebuilt: bool = False
    # Vectors deleted from a Chroma server, and why a server could not be reached: its
    # copies of the user's vectors then remain until `upc memory rebuild`.
    chroma_server_vectors: int = 0
    chroma_server_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def find_user_id(db: Database, name_or_id: str) -> str | None:
    with db.session() as s:
        user = s.scalar(select(User).where(User.username == name_or_id))
        if user is None:
            user = s.get(User, name_or_id)
        return None if user is None else user.id


def _purge_memory(
    db: Database, user_id: str, memory: MemoryPurger | None, chroma_dir: Path | None
) -> int:
    if memory is not None:
        return int(memory.purge_user(user_id))
    with db.session() as s:
        count = s.execute(delete(MemoryFactRow).where(MemoryFactRow.user_id == user_id)).rowcount
        s.execute(delete(MemoryFactHistoryRow).where(MemoryFactHistoryRow.user_id == user_id))
    if chroma_dir is not None and chroma_dir.is_dir():
        _delete_vectors(open_chroma(path=chroma_dir), DEFAULT_COLLECTION, user_id)
    return int(count)


def _delete_vectors(client: Any, collection_name: str, user_id: str) -> int:
    """Delete the user's vectors from one collection; how many there were."""
    try:
        collection = client.get_collection(collection_name)
    except Exception:  # no collection yet: nothing indexed
        log.debug("no memory collection %s", collection_name)
        return 0
    where = {"user_id": user_id}
    count = len(collection.get(where=where, include=[])["ids"])
    collection.delete(where=where)
    return count


def _purge_server(report: ErasureReport, url: str, collection: str, user_id: str) -> None:
    try:
        report.chroma_server_vectors = _delete_vectors(open_chroma(url=url), collection, user_id)
    except Exception as exc:  # the server's fault: the database erasure stands
        report.chroma_server_error = f"the Chroma server at {url} failed: {exc}"
        log.error(
            "erasure: %s; run `upc memory rebuild` once it is back", report.chroma_server_error
        )


def _rewrite_jsonl(path: Path, drop: set[str]) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    kept, removed = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        if isinstance(row, dict) and (row.get("dialogue_id") in drop or row.get("pair_id") in drop):
            removed += 1
            continue
        kept.append(line)
    if removed:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        os.replace(tmp, path)
    return removed


def _fix_selection(path: Path, drop: set[str]) -> None:
    """Keep `selection.json` consistent with the rewritten files (the ids hash is checked)."""
    try:
        selection = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    changed = False
    keys = ("training_dialogue_ids", "dialogue_ids", "easy_dialogue_ids", "sft_dialogue_ids")
    for key in (*keys, "heldout_dialogue_ids"):
        ids = selection.get(key)
        if isinstance(ids, list) and drop & set(ids):
            selection[key] = [i for i in ids if i not in drop]
            changed = True
    logged = selection.get("logged")
    if isinstance(logged, dict) and isinstance(logged.get("turn_ids"), list):
        kept = [i for i in logged["turn_ids"] if f"{LOGGED_PREFIX}{i}" not in drop]
        changed = changed or len(kept) != len(logged["turn_ids"])
        logged["turn_ids"] = kept
    counts = selection.get("counts")
    if isinstance(counts, dict):
        # `load_training_set` checks the row counts too; called after each rewritten file.
        for key, name in (
            ("sft", "sft.jsonl"),
            ("pairs", "pairs.jsonl"),
            ("heldout", "heldout.jsonl"),
        ):
            rows = path.parent / name
            if rows.is_file():
                n = sum(1 for x in rows.read_text("utf-8").splitlines() if x.strip())
                changed = changed or counts.get(key) != n
                counts[key] = n
    if not changed:
        return
    ids = sorted(selection.get("training_dialogue_ids") or [])
    selection["ids_sha256"] = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()
    selection["erasure_rewritten"] = True
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(selection, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _flag_adapters(registry: AdapterRegistry, drop: set[str], reason: str) -> list[str]:
    flagged = []
    names = (
        {f.name for f in dataclasses.fields(type(registry.list()[0]))} if registry.list() else set()
    )
    for manifest in registry.list():
        if not drop & set(manifest.training_dialogue_ids or []):
            continue
        flag = {"kind": "erasure", "reason": reason}
        if "flags" in names:
            registry.update_manifest(manifest.id, flags=[*(manifest.flags or []), flag])
        else:
            # No dedicated field in this manifest version: keep the flag with the metrics.
            metrics = dict(manifest.metrics or {})
            metrics["flags"] = [*metrics.get("flags", []), flag]
            registry.update_manifest(manifest.id, metrics=metrics)
        flagged.append(manifest.id)
    return flagged


def erase_user(
    db: Database,
    user_id: str,
    *,
    data_dir: Path,
    runs_dir: Path,
    registry: AdapterRegistry | None = None,
    memory: MemoryPurger | None = None,
    chroma_dir: Path | None = None,
    chroma_url: str | None = None,
    memory_collection: str = DEFAULT_COLLECTION,
    exports_dir: Path | None = None,
    downloads_dir: Path | None = None,
) -> ErasureReport:
    """Delete the user and everything derived from them; returns what was removed.

    With `chroma_url`, the user's vectors are also deleted from that Chroma server (the
    app's memory service does this itself when it is passed as `memory`); a server that
    fails is reported in `chroma_server_error` and the rest of the erasure still runs.
    """
    uhash = user_hash(user_id, load_salt(data_dir))
    report = ErasureReport(user_hash=uhash)
    with db.session() as s:
        turn_ids = list(s.scalars(select(LoggedTurnRow.id).where(LoggedTurnRow.user_id == user_id)))
        conv_ids = list(s.scalars(select(Conversation.id).where(Conversation.user_id == user_id)))
    drop = {f"{LOGGED_PREFIX}{i}" for i in turn_ids}
    report.memory_facts = _purge_memory(db, user_id, memory, chroma_dir)
    if chroma_url and memory is None:
        _purge_server(report, chroma_url, memory_collection, user_id)
    with db.session() as s:
        msg_ids = select(Message.id).where(Message.conversation_id.in_(conv_ids))
        report.feedback = s.execute(
            delete(Feedback).where((Feedback.user_id == user_id) | Feedback.message_id.in_(msg_ids))
        ).rowcount
        report.messages = s.execute(
            delete(Message).where(Message.conversation_id.in_(conv_ids))
        ).rowcount
        report.conversations = s.execute(
            delete(Conversation).where(Conversation.id.in_(conv_ids))
        ).rowcount
        report.logged_turns = s.execute(
            delete(LoggedTurnRow).where(LoggedTurnRow.user_id == user_id)
        ).rowcount
        report.guard_records = s.execute(
            delete(GuardExclusionRow).where(GuardExclusionRow.user_id == user_id)
        ).rowcount
        s.execute(delete(MemoryFactRow).where(MemoryFactRow.user_id == user_id))
        _delete_sessions_and_limits(s, user_id)
        s.execute(delete(User).where(User.id == user_id))
    if drop and Path(runs_dir).is_dir():
        for path in sorted(Path(runs_dir).rglob("*.jsonl")):
            removed = _rewrite_jsonl(path, drop)
            if removed:
                report.training_rows_removed += removed
                report.training_files_rewritten.append(str(path))
                _fix_selection(path.parent / "selection.json", drop)
    if drop and registry is not None:
        reason = f"trained on examples of an erased user ({uhash[:12]})"
        report.flagged_adapters = _flag_adapters(registry, drop, reason)
    if exports_dir is not None:
        report.exports_deleted = purge_exports(exports_dir, runs_dir, user_id, set(conv_ids))
    if downloads_dir is not None:
        report.download_copies_deleted = purge_downloads(downloads_dir)
    if chroma_dir is not None:
        report.chroma_rebuilt = compact_chroma(chroma_dir, DEFAULT_COLLECTION, user_id)
    with db.session() as s:
        s.add(
            ErasureRow(
                user_hash=uhash,
                counts={k: v for k, v in report.to_dict().items() if isinstance(v, int)},
                flagged_adapters=report.flagged_adapters,
            )
        )
    _compact(db)
    log.info("erased a user (%s): %s", uhash[:12], report.to_dict())
    return report


def _delete_sessions_and_limits(s: Session, user_id: str) -> None:
    """Every session of the user ends on every replica; the rate-limit and throttle rows
    keyed by the user go too (their keys are hashes, but of this user's id and name)."""
    name = s.scalar(select(User.username).where(User.id == user_id)) or ""
    s.execute(delete(WebSessionRow).where(WebSessionRow.user_id == user_id))
    windows = [limit_key(k) for k in (f"user:{user_id}", f"secret:user:{user_id}")]
    s.execute(delete(RateWindowRow).where(RateWindowRow.key.in_(windows)))
    s.execute(
        delete(LoginFailureRow).where(LoginFailureRow.key == limit_key(f"name:{name.lower()}"))
    )


# Every table erasure deletes from: PostgreSQL rewrites these (see `Database.compact`).
_ERASED_TABLES = tuple(
    row.__tablename__
    for row in (
        Feedback,
        Message,
        Conversation,
        LoggedTurnRow,
        GuardExclusionRow,
        MemoryFactRow,
        MemoryFactHistoryRow,
        WebSessionRow,
        RateWindowRow,
        LoginFailureRow,
        User,
    )
)


def _compact(db: Database) -> None:
    """No deleted page survives in the database files (SQLite VACUUM, PostgreSQL VACUUM
    FULL of the erased tables)."""
    db.compact(_ERASED_TABLES)
