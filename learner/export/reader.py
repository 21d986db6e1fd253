"""Reads real conversations and synthetic dialogues as `ExportRecord`s, page by page.

Both sources go through one streaming helper (`DialogueReader._pages`): rows in
(created_at, id) order from a server-side cursor, `chunk` per page, so that memory stays
bounded however large the export.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Row, Select, func, inspect, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import InstrumentedAttribute

from learner.export.records import (
    BotAttempt,
    ConversationMeta,
    CriticScores,
    ExportError,
    ExportFilters,
    ExportRecord,
    TurnMeta,
    iso,
)
from learner.pii import UserTerms, build_user_terms
from storage.corpus_models import DialogueRow, RunRow, TurnRow
from storage.db import Database
from storage.memory_models import MemoryFactRow
from storage.models import Conversation, Feedback, Message, User

__all__ = ["DialogueReader", "hash_user_id"]

_USER_CACHE = 1024
_T = TypeVar("_T")
# message id -> (rating, reason, given by the conversation's owner)
_Feedback = dict[str, tuple[int, str, bool]]


def hash_user_id(user_id: str, salt: str) -> str:
    return "u_" + hmac.new(salt.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:20]


@dataclass(frozen=True)
class _UserInfo:
    hashed: str
    terms: UserTerms


class DialogueReader:
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

    # -- the one streaming loop
    def _pages(
        self,
        query: Select[Any],
        created: InstrumentedAttribute[Any],
        row_id: InstrumentedAttribute[Any],
        load: Callable[[Connection, Sequence[Row[Any]]], _T],
    ) -> Iterator[tuple[Sequence[Row[Any]], _T]]:
        """Pages of `query`'s rows in (created, id) order, with what `load` reads for each.

        The rows come from one server-side cursor (`stream_results`: a named cursor on
        PostgreSQL, row-by-row stepping on SQLite), `chunk` rows per page, so the export
        reads one consistent snapshot and holds one page at a time. `load` runs on a second,
        short connection per page.
        """
        ordered = query.order_by(created, row_id)
        with self.db.engine.connect() as stream:
            result = stream.execution_options(stream_results=True, yield_per=self.chunk).execute(
                ordered
            )
            for rows in result.partitions():
                with self.db.engine.connect() as con:
                    loaded = load(con, rows)
                yield rows, loaded

    # -- real conversations
    def iter_real(self) -> Iterator[tuple[ExportRecord, UserTerms | None]]:
        query = (
            select(
                Conversation.id,
                Conversation.user_id,
                Conversation.title,
                Conversation.adapter_id,
                Conversation.created_at,
                Conversation.updated_at,
            )
            .join(User, User.id == Conversation.user_id)
            .where(*self._real_where(self.filters.include_opted_out))
        )
        pages = self._pages(query, Conversation.created_at, Conversation.id, self._load_real)
        for convs, (users, messages, feedback) in pages:
            by_conv: dict[str, list[Any]] = {}
            for m in messages:
                by_conv.setdefault(m.conversation_id, []).append(m)
            for conv in convs:
                info = users[conv.user_id]
                meta = ConversationMeta(
                    id=conv.id,
                    source="real",
                    created_at=iso(conv.created_at),
                    updated_at=iso(conv.updated_at),
                    user=info.hashed,
                    title=conv.title or "",
                )
                yield (
                    _real_record(meta, by_conv.get(conv.id, []), feedback, conv.adapter_id),
                    info.terms,
                )

    def _load_real(
        self, con: Connection, convs: Sequence[Row[Any]]
    ) -> tuple[dict[str, _UserInfo], Sequence[Row[Any]], _Feedback]:
        """The page's users, messages (in order) and feedback."""
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
        feedback: _Feedback = {}
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
            # The owner's latest rating wins over anyone else's.
            by_owner = row.user_id == owners.get(row.conversation_id)
            previous = feedback.get(row.message_id)
            if previous is None or by_owner or not previous[2]:
                feedback[row.message_id] = (int(row.rating), row.reason or "", by_owner)
        return users, messages, feedback

    # -- synthetic dialogues
    def iter_synthetic(self) -> Iterator[tuple[ExportRecord, UserTerms | None]]:
        query = (
            select(
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
            .join(RunRow, RunRow.id == DialogueRow.run_id)
            .where(*self._synthetic_where())
        )
        pages = self._pages(query, DialogueRow.created_at, DialogueRow.id, _load_turns)
        for dialogues, turns in pages:
            by_dialogue: dict[str, list[Any]] = {}
            for t in turns:
                by_dialogue.setdefault(t.dialogue_id, []).append(t)
            for d in dialogues:
                yield _synthetic_record(d, by_dialogue.get(d.id, [])), None


def _load_turns(con: Connection, dialogues: Sequence[Row[Any]]) -> Sequence[Row[Any]]:
    return con.execute(
        select(*_TURN_COLUMNS)
        .where(TurnRow.dialogue_id.in_([d.id for d in dialogues]))
        .order_by(TurnRow.dialogue_id, TurnRow.turn_index)
    ).all()


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
            created_at=iso(m.created_at),
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
        created_at=iso(d.created_at),
        updated_at=iso(d.finished_at),
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
            created_at=iso(t.created_at),
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
