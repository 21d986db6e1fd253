"""Dialogue export for researchers: JSONL (OpenAI `messages`), ShareGPT, Parquet, HF `datasets`.

`export()` streams conversations out of the database in keyset-paginated chunks and writes
every requested format incrementally, so memory stays bounded however large the export.
Real conversations come from the core tables; synthetic ones from the learner's corpus.
Every bot turn carries its adapter, critic scores and reasons, its regeneration history
(all versions, oldest first, the final reply last) and the user's feedback.

Schema convention (kept identical in every format so that `datasets.load_dataset("json")`
infers one stable schema): absent strings are `""`, absent scores / ratings / counts are `0`
(critic scores are 1..5), absent floats are `0.0`, and real conversations have iteration -1.

Files are written only inside `exports_dir/<export_id>/`; `resolve_export_file` is the one
safe way to map a download request to a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import and_, func, inspect, or_, select
from sqlalchemy.engine import Connection

from learner.pii import PiiScrubber, ScrubCounts, UserTerms, build_user_terms
from storage.corpus_models import DialogueRow, RunRow, TurnRow
from storage.db import Database
from storage.memory_models import MemoryFactRow
from storage.models import Conversation, Feedback, Message, User

__all__ = [
    "CONVERSATION_SCHEMA",
    "FEEDBACK_CHOICES",
    "FORMATS",
    "FORMAT_FILES",
    "MESSAGE_SCHEMA",
    "SALT_ENV",
    "SOURCES",
    "BotAttempt",
    "ConversationMeta",
    "CriticScores",
    "ExportCancelled",
    "ExportError",
    "ExportFilters",
    "ExportOptions",
    "ExportPathError",
    "ExportProgress",
    "ExportRecord",
    "ExportResult",
    "TurnMeta",
    "export",
    "hash_user_id",
    "list_exports",
    "new_export_id",
    "resolve_export_file",
]

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("jsonl", "sharegpt", "parquet", "hf")
FORMAT_FILES: dict[str, str] = {
    "jsonl": "dialogues.jsonl",
    "sharegpt": "dialogues.sharegpt.json",
    "parquet": "messages.parquet",
    "hf": "hf_dataset",
}
HF_ZIP = "hf_dataset.zip"
MANIFEST = "manifest.json"
SOURCES: tuple[str, ...] = ("real", "synthetic", "regenerated")
FEEDBACK_CHOICES: tuple[str, ...] = ("any", "liked", "disliked", "none")
SALT_ENV = "UPC_EXPORT_SALT"
SCHEMA_VERSION = 1

_EXPORT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,100}(?:\.[A-Za-z0-9]{1,10}){0,3}")
_ROW_GROUP = 20_000
_USER_CACHE = 1024


class ExportError(ValueError):
    """Bad export options (unknown user, bad filter, existing export id, ...)."""


class ExportPathError(ExportError):
    """A download request that does not name a file inside an export directory."""


class ExportCancelled(RuntimeError):
    """The caller's `cancel()` returned True; the partial export was removed."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CriticScores:
    """Critic scores of one reply (0 = not scored) with the critic's reason per dimension."""

    rel: int = 0
    int: int = 0  # the method's name for the interest dimension
    val: int = 0
    reason_rel: str = ""
    reason_int: str = ""
    reason_val: str = ""
    critic_model_id: str = ""

    @property
    def scored(self) -> bool:
        return self.rel > 0 and self.int > 0 and self.val > 0

    @property
    def mean(self) -> float:
        return (self.rel + self.int + self.val) / 3.0 if self.scored else 0.0

    @classmethod
    def from_score_dict(cls, data: Mapping[str, Any] | None) -> CriticScores:
        """From the learner's `Score.to_dict()` form (`rel`, `int`, `val`, `reasons`)."""
        if not data:
            return cls()
        reasons = data.get("reasons") or {}
        return cls(
            rel=int(data.get("rel") or 0),
            int=int(data.get("int") or 0),
            val=int(data.get("val") or 0),
            reason_rel=str(reasons.get("rel") or ""),
            reason_int=str(reasons.get("int") or ""),
            reason_val=str(reasons.get("val") or ""),
            critic_model_id=str(data.get("critic_model_id") or ""),
        )

    def scrubbed(self, fn: Callable[[str], str]) -> CriticScores:
        return CriticScores(
            self.rel,
            self.int,
            self.val,
            fn(self.reason_rel),
            fn(self.reason_int),
            fn(self.reason_val),
            self.critic_model_id,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rel": self.rel,
            "int": self.int,
            "val": self.val,
            "mean": float(self.mean),
            "reasons": {"rel": self.reason_rel, "int": self.reason_int, "val": self.reason_val},
            "critic_model_id": self.critic_model_id,
        }


@dataclass(frozen=True)
class BotAttempt:
    """One version of a bot turn. `origin`: initial | critic (critic-requested regeneration)
    | user (user pressed regenerate)."""

    content: str
    origin: str
    critic: CriticScores = field(default_factory=CriticScores)
    feedback: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "origin": self.origin,
            "critic": self.critic.to_json(),
            "feedback": self.feedback,
        }


@dataclass
class TurnMeta:
    """Metadata of one message, parallel to the `messages` list (user turns keep defaults)."""

    role: str
    message_id: str = ""
    seq: int = 0
    created_at: str = ""
    status: str = "complete"
    adapter_id: str = ""
    model_id: str = ""
    critic: CriticScores = field(default_factory=CriticScores)
    first_critic: CriticScores = field(default_factory=CriticScores)
    regenerations: int = 0
    regeneration_history: list[BotAttempt] = field(default_factory=list)
    feedback: int = 0  # +1 liked, -1 disliked, 0 none
    feedback_reason: str = ""
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gen_params_json: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "message_id": self.message_id,
            "seq": self.seq,
            "created_at": self.created_at,
            "status": self.status,
            "adapter_id": self.adapter_id,
            "model_id": self.model_id,
            "critic": self.critic.to_json(),
            "first_critic": self.first_critic.to_json(),
            "regenerations": self.regenerations,
            "regeneration_history": [a.to_json() for a in self.regeneration_history],
            "feedback": self.feedback,
            "feedback_reason": self.feedback_reason,
            "latency_ms": float(self.latency_ms),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "gen_params_json": self.gen_params_json,
        }


@dataclass
class ConversationMeta:
    id: str
    source: str  # real | synthetic
    created_at: str
    updated_at: str = ""
    split: str = ""  # synthetic: train | validation | test
    user: str = ""  # salted hash of the user id ("" for synthetic)
    title: str = ""
    persona_id: str = ""
    iteration: int = -1
    status: str = "complete"
    adapter_ids: list[str] = field(default_factory=list)
    n_messages: int = 0
    n_bot_turns: int = 0
    regenerated: bool = False
    regenerations: int = 0
    mean_rel: float = 0.0
    mean_int: float = 0.0
    mean_val: float = 0.0
    mean_score: float = 0.0
    likes: int = 0
    dislikes: int = 0
    chatbot_model_id: str = ""
    critic_model_id: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("mean_rel", "mean_int", "mean_val", "mean_score"):
            data[key] = float(data[key])
        return data


@dataclass
class ExportRecord:
    meta: ConversationMeta
    messages: list[tuple[str, str]]  # (role, content)
    turns: list[TurnMeta]

    def finalize(self) -> None:
        """Fill the conversation-level aggregates from the turns."""
        bots = [t for t in self.turns if t.role == "assistant"]
        scored = [t.critic for t in bots if t.critic.scored]
        meta = self.meta
        meta.n_messages = len(self.messages)
        meta.n_bot_turns = len(bots)
        meta.adapter_ids = sorted({t.adapter_id for t in bots if t.adapter_id})
        meta.regenerations = sum(t.regenerations for t in bots)
        meta.regenerated = meta.regenerations > 0
        meta.likes = sum(1 for t in bots if t.feedback > 0)
        meta.dislikes = sum(1 for t in bots if t.feedback < 0)
        if scored:
            n = len(scored)
            meta.mean_rel = sum(s.rel for s in scored) / n
            meta.mean_int = sum(s.int for s in scored) / n
            meta.mean_val = sum(s.val for s in scored) / n
            meta.mean_score = sum(s.mean for s in scored) / n
        if not meta.critic_model_id and scored:
            meta.critic_model_id = scored[0].critic_model_id

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": [{"role": r, "content": c} for r, c in self.messages],
            "upc": self.meta.to_json(),
            "upc_turns": [t.to_json() for t in self.turns],
        }


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ExportFilters:
    """Which conversations to export. Empty / None means no restriction.

    `sources` is a union: "real" and "synthetic" select by origin, "regenerated" adds any
    conversation with at least one regenerated bot turn. `min_score` / `max_score` bound the
    conversation's mean critic score (unscored conversations fail any score bound).
    `feedback`: liked / disliked = at least one such bot turn; none = no feedback at all.
    """

    since: datetime | None = None
    until: datetime | None = None  # exclusive
    users: tuple[str, ...] = ()  # usernames or user ids
    adapters: tuple[str, ...] = ()
    min_score: float | None = None
    max_score: float | None = None
    sources: tuple[str, ...] = ("real", "synthetic")
    feedback: str = "any"
    include_opted_out: bool = False  # users excluded from training / not opted in

    def validate(self) -> None:
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise ExportError(
                f"sources must be a non-empty subset of {SOURCES}, got {self.sources}"
            )
        if self.feedback not in FEEDBACK_CHOICES:
            raise ExportError(f"feedback must be one of {FEEDBACK_CHOICES}, got {self.feedback!r}")
        for name in ("min_score", "max_score"):
            value = getattr(self, name)
            if value is not None and not 1.0 <= value <= 5.0:
                raise ExportError(f"{name} must be within 1..5, got {value}")
        if (
            self.min_score is not None
            and self.max_score is not None
            and self.min_score > self.max_score
        ):
            raise ExportError("min_score is above max_score")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ExportError("the date range is empty (since >= until)")


@dataclass(frozen=True)
class ExportOptions:
    formats: tuple[str, ...] = FORMATS
    filters: ExportFilters = field(default_factory=ExportFilters)
    scrub: bool = True
    export_id: str | None = None  # default: a new timestamped id
    zip_hf_dataset: bool = True  # one downloadable file for the HF directory
    chunk_size: int = 500  # conversations per database page


@dataclass(frozen=True)
class ExportProgress:
    phase: str  # counting | writing | dataset | done
    conversations: int
    messages: int
    total_messages: int  # estimate: messages of the candidate conversations


@dataclass
class ExportResult:
    export_id: str
    directory: Path
    files: dict[str, Path]  # format -> path ("hf_zip" for the zipped dataset dir)
    conversations: int
    messages: int
    real: int
    synthetic: int
    skipped_opted_out: int
    skipped_empty: int
    scrubbed: ScrubCounts
    scrub_enabled: bool
    salt_source: str  # env | generated
    duration_s: float
    salt: str = field(repr=False, default="")  # never written into the export directory

    def summary(self) -> dict[str, Any]:
        return {
            "export_id": self.export_id,
            "directory": str(self.directory),
            "files": {k: str(v) for k, v in self.files.items()},
            "conversations": self.conversations,
            "messages": self.messages,
            "real": self.real,
            "synthetic": self.synthetic,
            "skipped_opted_out": self.skipped_opted_out,
            "skipped_empty": self.skipped_empty,
            "scrub_enabled": self.scrub_enabled,
            "scrubbed": self.scrubbed.to_dict(),
            "scrubbed_total": self.scrubbed.total,
            "salt_source": self.salt_source,
            "duration_s": round(self.duration_s, 3),
        }


# ----------------------------------------------------------------------------- paths


def new_export_id() -> str:
    return datetime.now(UTC).strftime("exp-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _check_export_id(export_id: str) -> None:
    if not isinstance(export_id, str) or not _EXPORT_ID.fullmatch(export_id):
        raise ExportPathError("invalid export id")


def resolve_export_file(exports_dir: Path, export_id: str, filename: str) -> Path:
    """The regular file `filename` of export `export_id`, or `ExportPathError`.

    Both parts must match strict patterns (no separators, no `..`, no `%`, no NUL), no part
    of the path may be a symlink, and the resolved path must lie inside the export dir.
    """
    _check_export_id(export_id)
    if not isinstance(filename, str) or not _FILENAME.fullmatch(filename) or ".." in filename:
        raise ExportPathError("invalid file name")
    base = Path(exports_dir).resolve()
    export_dir = base / export_id
    candidate = export_dir / filename
    try:
        if export_dir.is_symlink() or candidate.is_symlink():
            raise ExportPathError("invalid file name")
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ExportPathError("no such export file") from exc
    if resolved.parent != export_dir.resolve() or not resolved.is_relative_to(base):
        raise ExportPathError("invalid file name")
    if not resolved.is_file():
        raise ExportPathError("no such export file")
    return resolved


def list_exports(exports_dir: Path) -> list[dict[str, Any]]:
    """The manifests of the finished exports, newest first (for the console's list)."""
    base = Path(exports_dir)
    if not base.is_dir():
        return []
    manifests = []
    for child in base.iterdir():
        if child.is_symlink() or not child.is_dir() or not _EXPORT_ID.fullmatch(child.name):
            continue
        path = child / MANIFEST
        try:
            manifests.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(manifests, key=lambda m: str(m.get("created_at", "")), reverse=True)


def hash_user_id(user_id: str, salt: str) -> str:
    import hashlib
    import hmac

    return "u_" + hmac.new(salt.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:20]


# ----------------------------------------------------------------------------- reading


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value is not None else ""


@dataclass(frozen=True)
class _UserInfo:
    hashed: str
    terms: UserTerms


class _Reader:
    """Keyset-paginated reads of real and synthetic dialogues as `ExportRecord`s."""

    def __init__(self, db: Database, filters: ExportFilters, salt: str, chunk_size: int):
        self.db = db
        self.filters = filters
        self.salt = salt
        self.chunk = max(1, chunk_size)
        self.user_ids: tuple[str, ...] = ()
        self._users: OrderedDict[str, _UserInfo] = OrderedDict()

    # -- filters in SQL
    def resolve_users(self) -> None:
        if not self.filters.users:
            return
        wanted = set(self.filters.users)
        with self.db.engine.connect() as con:
            rows = con.execute(
                select(User.id, User.username).where(
                    or_(User.id.in_(wanted), User.username.in_(wanted))
                )
            ).all()
        found = {r.id for r in rows} | {r.username for r in rows}
        missing = sorted(wanted - found)
        if missing:
            raise ExportError(f"unknown user(s): {', '.join(missing)}")
        self.user_ids = tuple(sorted({r.id for r in rows}))

    def _real_where(self, include_opted_out: bool) -> list[Any]:
        f = self.filters
        where: list[Any] = []
        if f.since is not None:
            where.append(Conversation.created_at >= f.since)
        if f.until is not None:
            where.append(Conversation.created_at < f.until)
        if self.user_ids:
            where.append(Conversation.user_id.in_(self.user_ids))
        if not include_opted_out:
            where.append(User.excluded_from_training.is_(False))
            where.append(User.learning_opt_in.is_(True))
        return where

    def _synthetic_where(self) -> list[Any]:
        f = self.filters
        where: list[Any] = [DialogueRow.status != "running"]
        if f.since is not None:
            where.append(DialogueRow.created_at >= f.since)
        if f.until is not None:
            where.append(DialogueRow.created_at < f.until)
        return where

    @property
    def want_real(self) -> bool:
        return "real" in self.filters.sources or "regenerated" in self.filters.sources

    @property
    def want_synthetic(self) -> bool:
        wanted = "synthetic" in self.filters.sources or "regenerated" in self.filters.sources
        return wanted and not self.filters.users and self._has_learner_tables()

    def _has_learner_tables(self) -> bool:
        names = set(inspect(self.db.engine).get_table_names())
        return {"learn_dialogues", "learn_turns", "learn_runs"} <= names

    def count(self) -> tuple[int, int]:
        """(estimated messages to visit, conversations skipped because the user opted out)."""
        total = 0
        skipped = 0
        with self.db.engine.connect() as con:
            if self.want_real:
                base = (
                    select(func.count(Message.id))
                    .join(Conversation, Conversation.id == Message.conversation_id)
                    .join(User, User.id == Conversation.user_id)
                    .where(Message.status != "superseded")
                )
                total += con.scalar(base.where(*self._real_where(self.filters.include_opted_out)))
                if not self.filters.include_opted_out:
                    every = con.scalar(
                        select(func.count(Conversation.id))
                        .join(User, User.id == Conversation.user_id)
                        .where(*self._real_where(True))
                    )
                    kept = con.scalar(
                        select(func.count(Conversation.id))
                        .join(User, User.id == Conversation.user_id)
                        .where(*self._real_where(False))
                    )
                    skipped = int(every or 0) - int(kept or 0)
            if self.want_synthetic:
                dialogues = con.scalar(
                    select(func.count(DialogueRow.id)).where(*self._synthetic_where())
                )
                turns = con.scalar(
                    select(func.count(TurnRow.id))
                    .join(DialogueRow, DialogueRow.id == TurnRow.dialogue_id)
                    .where(*self._synthetic_where())
                )
                total += 2 * int(dialogues or 0) + 2 * int(turns or 0)
        return int(total or 0), skipped

    # -- users (bounded cache)
    def _user_infos(self, con: Connection, user_ids: set[str]) -> dict[str, _UserInfo]:
        missing = [u for u in user_ids if u not in self._users]
        if missing:
            names = dict(
                con.execute(select(User.id, User.username).where(User.id.in_(missing))).all()
            )
            facts: dict[str, list[str]] = {u: [] for u in missing}
            for uid, text in con.execute(
                select(MemoryFactRow.user_id, MemoryFactRow.text).where(
                    MemoryFactRow.user_id.in_(missing)
                )
            ):
                facts[uid].append(text)
            for uid in missing:
                self._users[uid] = _UserInfo(
                    hashed=hash_user_id(uid, self.salt),
                    terms=build_user_terms(names.get(uid, ""), facts[uid]),
                )
        out = {}
        for uid in user_ids:
            self._users.move_to_end(uid)
            out[uid] = self._users[uid]
        while len(self._users) > _USER_CACHE:
            self._users.popitem(last=False)
        return out

    # -- real conversations
    def iter_real(self) -> Iterator[tuple[ExportRecord, UserTerms | None]]:
        cols = (
            Conversation.id,
            Conversation.user_id,
            Conversation.title,
            Conversation.adapter_id,
            Conversation.created_at,
            Conversation.updated_at,
        )
        last: tuple[datetime, str] | None = None
        while True:
            with self.db.engine.connect() as con:
                query = (
                    select(*cols)
                    .join(User, User.id == Conversation.user_id)
                    .where(*self._real_where(self.filters.include_opted_out))
                    .order_by(Conversation.created_at, Conversation.id)
                    .limit(self.chunk)
                )
                if last is not None:
                    query = query.where(_after(Conversation.created_at, Conversation.id, last))
                convs = con.execute(query).all()
                if not convs:
                    return
                last = (convs[-1].created_at, convs[-1].id)
                ids = [c.id for c in convs]
                users = self._user_infos(con, {c.user_id for c in convs})
                messages = con.execute(
                    select(
                        Message.id,
                        Message.conversation_id,
                        Message.seq,
                        Message.role,
                        Message.content,
                        Message.status,
                        Message.model_id,
                        Message.adapter_id,
                        Message.gen_params,
                        Message.latency_ms,
                        Message.prompt_tokens,
                        Message.completion_tokens,
                        Message.created_at,
                    )
                    .where(Message.conversation_id.in_(ids))
                    .order_by(Message.conversation_id, Message.seq)
                ).all()
                feedback: dict[str, tuple[int, str, bool]] = {}
                owners = {c.id: c.user_id for c in convs}
                for row in con.execute(
                    select(
                        Feedback.message_id,
                        Feedback.user_id,
                        Feedback.rating,
                        Feedback.reason,
                        Message.conversation_id,
                    )
                    .join(Message, Message.id == Feedback.message_id)
                    .where(Message.conversation_id.in_(ids))
                    .order_by(Feedback.created_at)
                ):
                    by_owner = row.user_id == owners.get(row.conversation_id)
                    previous = feedback.get(row.message_id)
                    if previous is None or by_owner or not previous[2]:
                        feedback[row.message_id] = (int(row.rating), row.reason or "", by_owner)
            by_conv: dict[str, list[Any]] = {}
            for m in messages:
                by_conv.setdefault(m.conversation_id, []).append(m)
            for conv in convs:
                info = users[conv.user_id]
                meta = ConversationMeta(
                    id=conv.id,
                    source="real",
                    created_at=_iso(conv.created_at),
                    updated_at=_iso(conv.updated_at),
                    user=info.hashed,
                    title=conv.title or "",
                )
                yield (
                    _real_record(meta, by_conv.get(conv.id, []), feedback, conv.adapter_id),
                    info.terms,
                )

    # -- synthetic dialogues
    def iter_synthetic(self) -> Iterator[tuple[ExportRecord, UserTerms | None]]:
        cols = (
            DialogueRow.id,
            DialogueRow.persona_id,
            DialogueRow.status,
            DialogueRow.greeting,
            DialogueRow.user_intro,
            DialogueRow.chatbot_model_id,
            DialogueRow.critic_model_id,
            DialogueRow.adapter,
            DialogueRow.created_at,
            DialogueRow.finished_at,
            RunRow.iteration,
            RunRow.split,
        )
        last: tuple[datetime, str] | None = None
        while True:
            with self.db.engine.connect() as con:
                query = (
                    select(*cols)
                    .join(RunRow, RunRow.id == DialogueRow.run_id)
                    .where(*self._synthetic_where())
                    .order_by(DialogueRow.created_at, DialogueRow.id)
                    .limit(self.chunk)
                )
                if last is not None:
                    query = query.where(_after(DialogueRow.created_at, DialogueRow.id, last))
                dialogues = con.execute(query).all()
                if not dialogues:
                    return
                last = (dialogues[-1].created_at, dialogues[-1].id)
                turns = con.execute(
                    select(*_TURN_COLUMNS)
                    .where(TurnRow.dialogue_id.in_([d.id for d in dialogues]))
                    .order_by(TurnRow.dialogue_id, TurnRow.turn_index)
                ).all()
            by_dialogue: dict[str, list[Any]] = {}
            for t in turns:
                by_dialogue.setdefault(t.dialogue_id, []).append(t)
            for d in dialogues:
                yield _synthetic_record(d, by_dialogue.get(d.id, [])), None


def _real_record(
    meta: ConversationMeta,
    rows: list[Any],
    feedback: Mapping[str, tuple[int, str, bool]],
    conversation_adapter: str | None,
) -> ExportRecord:
    """Messages in order; superseded bot replies become the next reply's earlier versions."""
    messages: list[tuple[str, str]] = []
    turns: list[TurnMeta] = []
    superseded: list[BotAttempt] = []
    for m in rows:
        if m.status == "streaming":
            continue
        rating, reason, _ = feedback.get(m.id, (0, "", False))
        if m.role == "assistant" and m.status == "superseded":
            origin = "initial" if not superseded else "user"
            superseded.append(BotAttempt(m.content, origin, feedback=rating))
            continue
        turn = TurnMeta(
            role=m.role,
            message_id=m.id,
            seq=int(m.seq),
            created_at=_iso(m.created_at),
            status=m.status,
        )
        if m.role == "assistant":
            history = [*superseded, BotAttempt(m.content, "user" if superseded else "initial")]
            superseded = []
            turn.adapter_id = m.adapter_id or conversation_adapter or ""
            turn.model_id = m.model_id or ""
            turn.regenerations = len(history) - 1
            turn.regeneration_history = history
            turn.first_critic = history[0].critic
            turn.feedback = rating
            turn.feedback_reason = reason
            turn.latency_ms = float(m.latency_ms or 0.0)
            turn.prompt_tokens = int(m.prompt_tokens or 0)
            turn.completion_tokens = int(m.completion_tokens or 0)
            turn.gen_params_json = json.dumps(m.gen_params, sort_keys=True) if m.gen_params else ""
            if not meta.chatbot_model_id and m.model_id:
                meta.chatbot_model_id = m.model_id
        messages.append((m.role, m.content))
        turns.append(turn)
    record = ExportRecord(meta, messages, turns)
    record.finalize()
    return record


_TURN_COLUMNS = (
    TurnRow.dialogue_id,
    TurnRow.turn_index,
    TurnRow.first_reply,
    TurnRow.first_score,
    TurnRow.final_reply,
    TurnRow.final_score,
    TurnRow.regenerations,
    TurnRow.user_answer,
    TurnRow.created_at,
)


def _synthetic_record(d: Any, rows: list[Any]) -> ExportRecord:
    adapter = d.adapter or "base"
    meta = ConversationMeta(
        id=d.id,
        source="synthetic",
        created_at=_iso(d.created_at),
        updated_at=_iso(d.finished_at),
        split=d.split or "",
        persona_id=d.persona_id or "",
        iteration=int(d.iteration),
        status=d.status,
        chatbot_model_id=d.chatbot_model_id or "",
        critic_model_id=d.critic_model_id or "",
    )
    messages: list[tuple[str, str]] = []
    turns: list[TurnMeta] = []

    def bot(content: str, seq: int, **kw: Any) -> None:
        messages.append(("assistant", content))
        turns.append(
            TurnMeta(
                role="assistant",
                message_id=f"{d.id}-{seq}",
                seq=seq,
                adapter_id=adapter,
                model_id=meta.chatbot_model_id,
                **kw,
            )
        )

    def user(content: str, seq: int) -> None:
        messages.append(("user", content))
        turns.append(TurnMeta(role="user", message_id=f"{d.id}-{seq}", seq=seq))

    # t = 1: greeting and introduction, not scored (method, Algorithm 1).
    bot(d.greeting, 0, regeneration_history=[BotAttempt(d.greeting, "initial")])
    user(d.user_intro, 1)
    seq = 2
    for t in rows:
        final = CriticScores.from_score_dict(t.final_score)
        first = CriticScores.from_score_dict(t.first_score)
        if t.regenerations > 0:
            history = [
                BotAttempt(t.first_reply, "initial", first),
                BotAttempt(t.final_reply, "critic", final),
            ]
        else:
            history = [BotAttempt(t.final_reply, "initial", final)]
        bot(
            t.final_reply,
            seq,
            created_at=_iso(t.created_at),
            critic=final,
            first_critic=first,
            regenerations=int(t.regenerations),
            regeneration_history=history,
        )
        seq += 1
        if t.user_answer:
            user(t.user_answer, seq)
            seq += 1
    record = ExportRecord(meta, messages, turns)
    record.finalize()
    return record


def _selected(record: ExportRecord, f: ExportFilters) -> bool:
    meta = record.meta
    if not (meta.source in f.sources or ("regenerated" in f.sources and meta.regenerated)):
        return False
    if f.adapters and not set(f.adapters) & set(meta.adapter_ids):
        return False
    if f.min_score is not None or f.max_score is not None:
        if meta.mean_score <= 0:
            return False
        if f.min_score is not None and meta.mean_score < f.min_score:
            return False
        if f.max_score is not None and meta.mean_score > f.max_score:
            return False
    if f.feedback == "liked":
        return meta.likes > 0
    if f.feedback == "disliked":
        return meta.dislikes > 0
    if f.feedback == "none":
        return meta.likes == 0 and meta.dislikes == 0
    return True


def _scrub_record(
    record: ExportRecord, scrubber: PiiScrubber, counts: ScrubCounts, terms: UserTerms | None
) -> None:
    def fn(text: str) -> str:
        return scrubber.scrub(text, counts, terms)

    # A critique repeated across fields (final score == last attempt's) is scrubbed and
    # counted once.
    memo: dict[CriticScores, CriticScores] = {}

    def critic(c: CriticScores) -> CriticScores:
        if c not in memo:
            memo[c] = c.scrubbed(fn)
        return memo[c]

    record.meta.title = fn(record.meta.title)
    record.messages = [(role, fn(content)) for role, content in record.messages]
    for i, turn in enumerate(record.turns):
        turn.critic = critic(turn.critic)
        turn.first_critic = critic(turn.first_critic)
        turn.feedback_reason = fn(turn.feedback_reason)
        last = len(turn.regeneration_history) - 1
        # The final version repeats the message: reuse its scrubbed text (counted once).
        turn.regeneration_history = [
            BotAttempt(
                record.messages[i][1] if n == last else fn(a.content),
                a.origin,
                critic(a.critic),
                a.feedback,
            )
            for n, a in enumerate(turn.regeneration_history)
        ]


# ----------------------------------------------------------------------------- schemas

_CRITIC_TYPE = pa.struct(
    [
        ("rel", pa.int64()),
        ("int", pa.int64()),
        ("val", pa.int64()),
        ("mean", pa.float64()),
        ("reasons", pa.struct([("rel", pa.string()), ("int", pa.string()), ("val", pa.string())])),
        ("critic_model_id", pa.string()),
    ]
)
_ATTEMPT_TYPE = pa.struct(
    [
        ("content", pa.string()),
        ("origin", pa.string()),
        ("critic", _CRITIC_TYPE),
        ("feedback", pa.int64()),
    ]
)
_TURN_TYPE = pa.struct(
    [
        ("role", pa.string()),
        ("message_id", pa.string()),
        ("seq", pa.int64()),
        ("created_at", pa.string()),
        ("status", pa.string()),
        ("adapter_id", pa.string()),
        ("model_id", pa.string()),
        ("critic", _CRITIC_TYPE),
        ("first_critic", _CRITIC_TYPE),
        ("regenerations", pa.int64()),
        ("regeneration_history", pa.list_(_ATTEMPT_TYPE)),
        ("feedback", pa.int64()),
        ("feedback_reason", pa.string()),
        ("latency_ms", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("gen_params_json", pa.string()),
    ]
)
_META_TYPE = pa.struct(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("created_at", pa.string()),
        ("updated_at", pa.string()),
        ("split", pa.string()),
        ("user", pa.string()),
        ("title", pa.string()),
        ("persona_id", pa.string()),
        ("iteration", pa.int64()),
        ("status", pa.string()),
        ("adapter_ids", pa.list_(pa.string())),
        ("n_messages", pa.int64()),
        ("n_bot_turns", pa.int64()),
        ("regenerated", pa.bool_()),
        ("regenerations", pa.int64()),
        ("mean_rel", pa.float64()),
        ("mean_int", pa.float64()),
        ("mean_val", pa.float64()),
        ("mean_score", pa.float64()),
        ("likes", pa.int64()),
        ("dislikes", pa.int64()),
        ("chatbot_model_id", pa.string()),
        ("critic_model_id", pa.string()),
    ]
)
# One row per conversation (the JSONL record and the HF dataset).
CONVERSATION_SCHEMA = pa.schema(
    [
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("upc", _META_TYPE),
        ("upc_turns", pa.list_(_TURN_TYPE)),
    ]
)
# One row per message, flat (Parquet).
MESSAGE_SCHEMA = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("user", pa.string()),
        ("conversation_created_at", pa.string()),
        ("title", pa.string()),
        ("persona_id", pa.string()),
        ("iteration", pa.int64()),
        ("conversation_mean_score", pa.float64()),
        ("turn", pa.int64()),
        ("role", pa.string()),
        ("content", pa.string()),
        ("message_id", pa.string()),
        ("seq", pa.int64()),
        ("created_at", pa.string()),
        ("status", pa.string()),
        ("adapter_id", pa.string()),
        ("model_id", pa.string()),
        ("rel", pa.int64()),
        ("int", pa.int64()),
        ("val", pa.int64()),
        ("score_mean", pa.float64()),
        ("reason_rel", pa.string()),
        ("reason_int", pa.string()),
        ("reason_val", pa.string()),
        ("critic_model_id", pa.string()),
        ("first_rel", pa.int64()),
        ("first_int", pa.int64()),
        ("first_val", pa.int64()),
        ("regenerations", pa.int64()),
        ("regeneration_history_json", pa.string()),
        ("feedback", pa.int64()),
        ("feedback_reason", pa.string()),
        ("latency_ms", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("gen_params_json", pa.string()),
    ]
)


def _message_rows(record: ExportRecord) -> Iterator[dict[str, Any]]:
    meta = record.meta
    for i, ((role, content), t) in enumerate(zip(record.messages, record.turns, strict=True)):
        c, first = t.critic, t.first_critic
        yield {
            "conversation_id": meta.id,
            "source": meta.source,
            "split": meta.split,
            "user": meta.user,
            "conversation_created_at": meta.created_at,
            "title": meta.title,
            "persona_id": meta.persona_id,
            "iteration": meta.iteration,
            "conversation_mean_score": float(meta.mean_score),
            "turn": i,
            "role": role,
            "content": content,
            "message_id": t.message_id,
            "seq": t.seq,
            "created_at": t.created_at,
            "status": t.status,
            "adapter_id": t.adapter_id,
            "model_id": t.model_id,
            "rel": c.rel,
            "int": c.int,
            "val": c.val,
            "score_mean": float(c.mean),
            "reason_rel": c.reason_rel,
            "reason_int": c.reason_int,
            "reason_val": c.reason_val,
            "critic_model_id": c.critic_model_id,
            "first_rel": first.rel,
            "first_int": first.int,
            "first_val": first.val,
            "regenerations": t.regenerations,
            "regeneration_history_json": json.dumps(
                [a.to_json() for a in t.regeneration_history], ensure_ascii=False
            ),
            "feedback": t.feedback,
            "feedback_reason": t.feedback_reason,
            "latency_ms": float(t.latency_ms),
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "gen_params_json": t.gen_params_json,
        }


# ----------------------------------------------------------------------------- writers


class _JsonlWriter:
    def __init__(self, path: Path):
        self.path = path
        self._fh: IO[str] = path.open("w", encoding="utf-8")

    def write(self, record: ExportRecord, data: dict[str, Any]) -> None:
        self._fh.write(json.dumps(data, ensure_ascii=False))
        self._fh.write("\n")

    def close(self) -> None:
        self._fh.close()


class _ShareGptWriter:
    _ROLES: ClassVar[dict[str, str]] = {"user": "human", "assistant": "gpt", "system": "system"}

    def __init__(self, path: Path):
        self.path = path
        self._fh: IO[str] = path.open("w", encoding="utf-8")
        self._fh.write("[")
        self._first = True

    def write(self, record: ExportRecord, data: dict[str, Any]) -> None:
        item = {
            "id": record.meta.id,
            "conversations": [
                {"from": self._ROLES.get(r, r), "value": c} for r, c in record.messages
            ],
            "upc": data["upc"],
            "upc_turns": data["upc_turns"],
        }
        self._fh.write("\n" if self._first else ",\n")
        self._first = False
        self._fh.write(json.dumps(item, ensure_ascii=False))

    def close(self) -> None:
        self._fh.write("\n]\n")
        self._fh.close()


class _ParquetWriter:
    """Buffers one row group column-wise (lists are far lighter than per-row dicts)."""

    def __init__(self, path: Path, row_group: int = _ROW_GROUP):
        self.path = path
        self._writer = pq.ParquetWriter(path, MESSAGE_SCHEMA, compression="zstd")
        self._columns: dict[str, list[Any]] = {name: [] for name in MESSAGE_SCHEMA.names}
        self._rows = 0
        self._row_group = row_group

    def write(self, record: ExportRecord, data: dict[str, Any]) -> None:
        for row in _message_rows(record):
            for name, value in row.items():
                self._columns[name].append(value)
            self._rows += 1
        if self._rows >= self._row_group:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            table = pa.Table.from_pydict(self._columns, schema=MESSAGE_SCHEMA)
            self._writer.write_table(table, row_group_size=self._row_group)
            self._columns = {name: [] for name in MESSAGE_SCHEMA.names}
            self._rows = 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


class _HfDatasetWriter:
    """Writes a `datasets.save_to_disk` directory directly, shard by shard.

    Rows are buffered for `batch_rows` conversations, then appended to the current Arrow
    shard; a shard is closed at `max_shard_bytes`. Memory stays bounded by one batch,
    whatever the export size (building a `Dataset` first and then `save_to_disk` would
    write everything twice and page the whole cache file in).
    """

    def __init__(self, path: Path, batch_rows: int = 1000, max_shard_bytes: int = 500 << 20):
        from datasets import Features

        self.path = path
        self._staging = path.with_name(f".{path.name}.partial")
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(parents=True)
        self._features = Features.from_arrow_schema(CONVERSATION_SCHEMA)
        self._batch_rows = batch_rows
        self._max_shard_bytes = max_shard_bytes
        self._rows: list[dict[str, Any]] = []
        self._shards: list[Path] = []
        self._writer: Any = None
        self._digest = hashlib.sha256()

    def write(self, record: ExportRecord, data: dict[str, Any]) -> None:
        self._rows.append(data)
        self._digest.update(str(data["upc"]["id"]).encode("utf-8"))
        if len(self._rows) >= self._batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        self._append(pa.Table.from_pylist(self._rows, schema=CONVERSATION_SCHEMA))
        self._rows = []

    def _append(self, table: pa.Table) -> None:
        from datasets.arrow_writer import ArrowWriter

        if self._writer is None:
            shard = self._staging / f"shard-{len(self._shards):05d}.arrow"
            self._shards.append(shard)
            self._writer = ArrowWriter(features=self._features, path=str(shard))
        self._writer.write_table(table)
        if self._writer._num_bytes >= self._max_shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        from datasets import DatasetInfo

        self._flush()
        if not self._shards:  # an empty export is still a loadable (empty) dataset
            self._append(CONVERSATION_SCHEMA.empty_table())
        self._close_shard()
        n = len(self._shards)
        files = []
        for i, shard in enumerate(self._shards):
            name = f"data-{i:05d}-of-{n:05d}.arrow"
            shard.rename(self._staging / name)
            files.append({"filename": name})
        state = {
            "_data_files": files,
            "_fingerprint": self._digest.hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        _write_json(self._staging / "state.json", state)
        info = asdict(DatasetInfo(features=self._features))
        _write_json(self._staging / "dataset_info.json", {k: info[k] for k in sorted(info)})
        shutil.rmtree(self.path, ignore_errors=True)
        self._staging.rename(self.path)


def _zip_dir(source: Path, target: Path) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file() and not path.is_symlink():
                zf.write(path, arcname=f"{source.name}/{path.relative_to(source).as_posix()}")


# ----------------------------------------------------------------------------- export


def export(
    db: Database,
    exports_dir: Path,
    options: ExportOptions | None = None,
    *,
    progress: Callable[[ExportProgress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    env: Mapping[str, str] | None = None,
    runs_dir: Path | None = None,
) -> ExportResult:
    """Export the selected dialogues into `exports_dir/<export_id>/` in the requested formats.

    `progress` is called after every page of conversations; `cancel()` returning True stops
    the export and removes its directory. The salt that hashes user ids comes from
    `$UPC_EXPORT_SALT` or is generated; it is returned (and written to `runs_dir` when given)
    but never written into the export directory.
    """
    options = options or ExportOptions()
    formats = tuple(dict.fromkeys(options.formats))
    if not formats or set(formats) - set(FORMATS):
        raise ExportError(f"formats must be a non-empty subset of {FORMATS}, got {options.formats}")
    options.filters.validate()
    export_id = options.export_id or new_export_id()
    _check_export_id(export_id)
    env = os.environ if env is None else env
    salt = env.get(SALT_ENV, "")
    salt_source = "env" if salt else "generated"
    salt = salt or secrets.token_hex(16)

    reader = _Reader(db, options.filters, salt, options.chunk_size)
    reader.resolve_users()
    exports_dir = Path(exports_dir)
    exports_dir.mkdir(parents=True, exist_ok=True)
    out_dir = exports_dir / export_id
    try:
        out_dir.mkdir()
    except FileExistsError as exc:
        raise ExportError(f"export {export_id} already exists") from exc

    started = time.monotonic()
    try:
        result = _run(reader, options, formats, out_dir, progress, cancel)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    result.salt, result.salt_source = salt, salt_source
    result.duration_s = time.monotonic() - started
    _write_json(out_dir / MANIFEST, _manifest(result, options, formats))
    if runs_dir is not None:
        record_dir = Path(runs_dir) / "exports"
        record_dir.mkdir(parents=True, exist_ok=True)
        _write_json(record_dir / f"{export_id}.json", {**result.summary(), "salt": salt})
    log.info(
        "export %s: %d conversations, %d messages, %d PII replacements",
        export_id,
        result.conversations,
        result.messages,
        result.scrubbed.total,
    )
    return result


def _run(
    reader: _Reader,
    options: ExportOptions,
    formats: tuple[str, ...],
    out_dir: Path,
    progress: Callable[[ExportProgress], None] | None,
    cancel: Callable[[], bool] | None,
) -> ExportResult:
    files: dict[str, Path] = {}
    writers: list[Any] = []
    if "jsonl" in formats:
        files["jsonl"] = out_dir / FORMAT_FILES["jsonl"]
        writers.append(_JsonlWriter(files["jsonl"]))
    if "sharegpt" in formats:
        files["sharegpt"] = out_dir / FORMAT_FILES["sharegpt"]
        writers.append(_ShareGptWriter(files["sharegpt"]))
    if "parquet" in formats:
        files["parquet"] = out_dir / FORMAT_FILES["parquet"]
        writers.append(_ParquetWriter(files["parquet"]))
    if "hf" in formats:
        files["hf"] = out_dir / FORMAT_FILES["hf"]
        writers.append(_HfDatasetWriter(files["hf"]))

    def report(phase: str) -> None:
        if progress is not None:
            progress(ExportProgress(phase, conversations, messages, total))

    conversations = messages = real = synthetic = skipped_empty = 0
    total = 0
    report("counting")
    total, skipped_opted_out = reader.count()
    scrubber = PiiScrubber()
    counts = ScrubCounts()
    sources: list[Iterator[tuple[ExportRecord, UserTerms | None]]] = []
    if reader.want_real:
        sources.append(reader.iter_real())
    if reader.want_synthetic:
        sources.append(reader.iter_synthetic())
    visited = 0
    try:
        for source in sources:
            for record, terms in source:
                visited += 1
                if record.meta.n_bot_turns == 0:
                    skipped_empty += 1
                elif _selected(record, reader.filters):
                    if options.scrub:
                        _scrub_record(record, scrubber, counts, terms)
                    data = record.to_json()
                    for writer in writers:
                        writer.write(record, data)
                    conversations += 1
                    messages += len(record.messages)
                    if record.meta.source == "real":
                        real += 1
                    else:
                        synthetic += 1
                if visited % reader.chunk == 0:
                    if cancel is not None and cancel():
                        raise ExportCancelled("export cancelled")
                    report("writing")
    finally:
        for writer in writers:
            writer.close()
    report("writing")
    if "hf" in formats and options.zip_hf_dataset:
        report("dataset")
        files["hf_zip"] = out_dir / HF_ZIP
        _zip_dir(files["hf"], files["hf_zip"])
    report("done")
    return ExportResult(
        export_id=out_dir.name,
        directory=out_dir,
        files=files,
        conversations=conversations,
        messages=messages,
        real=real,
        synthetic=synthetic,
        skipped_opted_out=skipped_opted_out,
        skipped_empty=skipped_empty,
        scrubbed=counts,
        scrub_enabled=options.scrub,
        salt_source="",
        duration_s=0.0,
    )


def _manifest(result: ExportResult, options: ExportOptions, formats: tuple[str, ...]) -> dict:
    f = options.filters
    filters = asdict(f)
    filters["since"] = _iso(f.since) or None
    filters["until"] = _iso(f.until) or None
    # Usernames are identifying: the manifest records only how many users were selected.
    filters["users"] = len(f.users)
    summary = result.summary()
    summary.pop("directory")
    summary["files"] = {k: v.name for k, v in result.files.items()}
    return {
        **summary,
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "formats": list(formats),
        "filters": filters,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _after(created: Any, row_id: Any, last: tuple[Any, Any]) -> Any:
    """Keyset pagination: rows strictly after `last` in (created, id) order."""
    return or_(created > last[0], and_(created == last[0], row_id > last[1]))
