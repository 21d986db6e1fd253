"""Conversations: store every turn, build prompts, stream replies, feedback.

Ordering guarantees: a user message is committed before generation starts; a bot reply is
committed when it completes, or with status `interrupted` (and its partial text) when the
model fails, times out or the client goes away. A reply that streams for longer than a
second is also saved as it grows (status `streaming`), so a killed process loses at most a
second of it; the next start marks such rows `interrupted` (`mark_interrupted_streams`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from chatbot.limits import LimitReached, SlidingWindows, WindowLimit
from chatbot.memory import MemoryFact, recall_opener, render_profile
from core.prompting import PromptTooLongError, fit_prompt, load_prompt
from core.types import (
    BASE_ADAPTER,
    ChatMessage,
    ChatModel,
    Completion,
    GenerationParams,
    ModelBusyError,
    ModelError,
)
from core.validation import InputError, clean_message
from storage import Database
from storage.models import Conversation, Feedback, Message, User, utcnow

__all__ = [
    "ChatService",
    "ConversationSummary",
    "MemoryHooks",
    "MessageRecord",
    "NotFoundError",
    "RateLimitError",
    "ReplyEvent",
    "StorageError",
]

log = logging.getLogger(__name__)

_APPEND_RETRIES = 8
_PARTIAL_FLUSH_S = 1.0  # how often a growing reply is saved
_STORAGE_ERROR = (
    "Your message could not be saved just now (the server is busy); please try again in a moment."
)


class NotFoundError(LookupError):
    """No such conversation or message *for this user* (others' data looks absent)."""


class RateLimitError(InputError):
    pass


class StorageError(RuntimeError):
    """The database refused a write (locked, full...); the message is safe to show, the
    details (SQL, parameters) are only in the log."""


class MemoryHooks(Protocol):
    """What the chat needs from the per-user memory (see chatbot.memory)."""

    def remember(
        self, user_id: str, text: str, *, message_id: str | None, conversation_id: str | None
    ) -> object: ...

    def context_block(self, user_id: str, query: str, *, top_k: int, token_budget: int) -> str: ...

    def profile_facts(self, user_id: str) -> list[MemoryFact]: ...

    def is_enabled(self, user_id: str) -> bool: ...


@dataclass(frozen=True)
class MessageRecord:
    id: str
    seq: int
    role: str
    content: str
    status: str
    adapter_id: str | None
    created_at: datetime
    rating: int | None = None


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    updated_at: datetime
    message_count: int


@dataclass(frozen=True)
class ReplyEvent:
    kind: str  # "delta" | "done" | "error"
    text: str
    message_id: str | None = None
    status: str | None = None


class ChatService:
    def __init__(
        self,
        db: Database,
        model: ChatModel,
        *,
        params: GenerationParams,
        max_message_chars: int = 4000,
        history_turns: int = 12,
        messages_per_minute: int = 0,
        address_messages_per_minute: int = 0,
        adapter_for: Callable[[str], str] | None = None,
        memory: MemoryHooks | None = None,
        memory_top_k: int = 5,
        memory_token_budget: int = 160,
        context_tokens: int = 8192,
    ):
        self.db = db
        self.model = model
        self.params = params
        self.max_message_chars = max_message_chars
        self.history_turns = history_turns
        self.adapter_for = adapter_for or (lambda _conversation_id: BASE_ADAPTER)
        self.memory = memory
        self.memory_top_k = memory_top_k
        self.memory_token_budget = memory_token_budget
        # Prompt tokens allowed: the context window less room for the longest reply.
        self.prompt_budget = context_tokens - params.max_new_tokens
        # Sends and regenerations count against the user and the client's address: a new
        # anonymous identity is free to make, an address is not.
        self.messages_per_minute = messages_per_minute
        self.address_messages_per_minute = address_messages_per_minute
        self._limiter = SlidingWindows(db)  # in the database: shared by every replica
        self._system = load_prompt("upc_system")

    # ------------------------------------------------------------ conversations
    def list_conversations(self, user_id: str) -> list[ConversationSummary]:
        _require_user(user_id)
        with self.db.session() as s:
            counts = (
                select(Message.conversation_id, func.count(Message.id).label("n"))
                .group_by(Message.conversation_id)
                .subquery()
            )
            rows = s.execute(
                select(Conversation, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.conversation_id == Conversation.id)
                .where(Conversation.user_id == user_id)
                .order_by(Conversation.updated_at.desc())
            ).all()
            return [ConversationSummary(c.id, c.title, c.updated_at, int(n)) for c, n in rows]

    def create_conversation(self, user_id: str) -> str:
        _require_user(user_id)
        with self.db.session() as s:
            if s.get(User, user_id) is None:
                raise NotFoundError("unknown user")
            conversation = Conversation(user_id=user_id)
            s.add(conversation)
            s.flush()
            return conversation.id

    def messages(self, user_id: str, conversation_id: str) -> list[MessageRecord]:
        with self.db.session() as s:
            self._owned(s, user_id, conversation_id)
            ratings = dict(
                s.execute(
                    select(Feedback.message_id, Feedback.rating)
                    .join(Message, Message.id == Feedback.message_id)
                    .where(Message.conversation_id == conversation_id)
                    .where(Feedback.user_id == user_id)
                ).all()
            )
            rows = s.scalars(
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .where(Message.status != "superseded")
                .order_by(Message.seq)
            ).all()
            return [
                MessageRecord(
                    m.id,
                    m.seq,
                    m.role,
                    m.content,
                    m.status,
                    m.adapter_id,
                    m.created_at,
                    ratings.get(m.id),
                )
                for m in rows
            ]

    def delete_conversation(self, user_id: str, conversation_id: str) -> None:
        with self.db.session() as s:
            s.delete(self._owned(s, user_id, conversation_id))

    # ------------------------------------------------------------ replies
    def stream_greeting(self, user_id: str, conversation_id: str) -> Generator[ReplyEvent]:
        """The bot speaks first. Uses the memory profile when there is one."""
        with self.db.session() as s:
            conversation = self._owned(s, user_id, conversation_id)
            if s.scalar(
                select(func.count(Message.id)).where(Message.conversation_id == conversation.id)
            ):
                return
        messages, opener = self._greeting(user_id, conversation_id)
        yield from self._stream_reply(user_id, conversation_id, messages, opener=opener)

    def send(
        self, user_id: str, conversation_id: str, text: object, *, client: str = ""
    ) -> Generator[ReplyEvent]:
        """Validate and store the user's message, then stream and store the reply.

        `client` is the caller's address (for the rate limit). Raises InputError (nothing
        stored) or NotFoundError before yielding anything.
        """
        cleaned = clean_message(text, self.max_message_chars)
        with self.db.session() as s:
            self._owned(s, user_id, conversation_id)
        # Refused before anything is stored if it could never fit the context window.
        fit_prompt(
            [ChatMessage("system", str(self._system)), ChatMessage("user", cleaned)],
            self.model.count_tokens,
            self.prompt_budget,
        )
        self._check_limits(user_id, client)
        message_id = self._append(conversation_id, role="user", content=cleaned, status="complete")
        self._remember_async(user_id, cleaned, message_id, conversation_id)
        return self._stream_reply(user_id, conversation_id, self._prompt(user_id, conversation_id))

    def regenerate(
        self, user_id: str, conversation_id: str, *, client: str = ""
    ) -> Generator[ReplyEvent]:
        """Replace the last bot reply with a new one (the old one is kept, superseded)."""
        with self.db.session() as s:
            self._owned(s, user_id, conversation_id)
        # Counted in its own transaction, before this one reads anything (on SQLite, a read
        # transaction that sees another commit can no longer write).
        self._check_limits(user_id, client)
        with self.db.session() as s:
            self._owned(s, user_id, conversation_id)
            last = s.scalar(
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .where(Message.status != "superseded")
                .order_by(Message.seq.desc())
                .limit(1)
            )
            if last is None or last.role != "assistant":
                raise InputError("There is no bot reply to regenerate yet.")
            has_user_turn = s.scalar(
                select(func.count(Message.id))
                .where(Message.conversation_id == conversation_id)
                .where(Message.role == "user")
            )
            last.status = "superseded"
        if not has_user_turn:
            messages, opener = self._greeting(user_id, conversation_id)
            return self._stream_reply(user_id, conversation_id, messages, opener=opener)
        return self._stream_reply(user_id, conversation_id, self._prompt(user_id, conversation_id))

    def rate(self, user_id: str, message_id: str, rating: int, reason: str | None = None) -> None:
        if rating not in (1, -1):
            raise InputError("A rating is like (+1) or dislike (-1).")
        if reason is not None:
            reason = clean_message(reason, 1000) if reason.strip() else None
        with self.db.session() as s:
            message = s.get(Message, message_id)
            if message is None or message.role != "assistant":
                raise NotFoundError("no such reply")
            self._owned(s, user_id, message.conversation_id)
            existing = s.scalar(
                select(Feedback)
                .where(Feedback.message_id == message_id)
                .where(Feedback.user_id == user_id)
            )
            if existing is None:
                s.add(
                    Feedback(message_id=message_id, user_id=user_id, rating=rating, reason=reason)
                )
            else:
                existing.rating, existing.reason, existing.created_at = rating, reason, utcnow()

    # ------------------------------------------------------------ internals
    def _check_limits(self, user_id: str, client: str) -> None:
        """Count one message against the user and the address, or refuse and count nothing;
        a limit of 0 is off."""
        limits = [WindowLimit(f"user:{user_id}", self.messages_per_minute, 60.0, "You")]
        if client:
            limits.append(
                WindowLimit(
                    f"addr:{client}", self.address_messages_per_minute, 60.0, "Your network"
                )
            )
        try:
            self._limiter.take(limits)
        except SQLAlchemyError as exc:
            log.error("could not count a message against the rate limits: %s", exc)
            raise StorageError(_STORAGE_ERROR) from exc
        except LimitReached as exc:
            wait = int(exc.wait_s) + 1
            raise RateLimitError(
                f"{exc.limit.what} can send {exc.limit.count} messages a minute; "
                f"please wait {wait}s."
            ) from None

    def _owned(self, s, user_id: str, conversation_id: str) -> Conversation:  # type: ignore[no-untyped-def]
        _require_user(user_id)
        conversation = s.get(Conversation, conversation_id) if conversation_id else None
        if conversation is None or conversation.user_id != user_id:
            raise NotFoundError("no such conversation")
        return conversation

    def _append(self, conversation_id: str, **fields: object) -> str:
        # Two writers (tabs, processes) may race for the next seq; the unique constraint
        # catches it and we retry with a fresh number.
        for attempt in range(_APPEND_RETRIES):
            try:
                with self.db.session() as s:
                    seq = s.scalar(
                        select(func.coalesce(func.max(Message.seq), -1)).where(
                            Message.conversation_id == conversation_id
                        )
                    )
                    message = Message(conversation_id=conversation_id, seq=int(seq) + 1, **fields)
                    s.add(message)
                    conversation = s.get(Conversation, conversation_id)
                    conversation.updated_at = utcnow()
                    if fields.get("role") == "user" and conversation.title == "New conversation":
                        conversation.title = _title_from(str(fields["content"]))
                    s.flush()
                    return message.id
            except IntegrityError:
                if attempt == _APPEND_RETRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
            except SQLAlchemyError as exc:
                log.error("could not store a message of conversation %s: %s", conversation_id, exc)
                raise StorageError(_STORAGE_ERROR) from exc
        raise AssertionError("unreachable")

    def _update(self, message_id: str, **fields: object) -> None:
        try:
            with self.db.session() as s:
                message = s.get(Message, message_id)
                if message is None:
                    raise NotFoundError("no such message")
                for name, value in fields.items():
                    setattr(message, name, value)
        except SQLAlchemyError as exc:
            log.error("could not update message %s: %s", message_id, exc)
            raise StorageError(_STORAGE_ERROR) from exc

    def _save_partial(
        self, conversation_id: str, message_id: str | None, text: str, adapter: str | None
    ) -> str | None:
        """Save the reply so far; a failure only costs this snapshot, never the stream."""
        try:
            if message_id is not None:
                self._update(message_id, content=text)
                return message_id
            return self._append(
                conversation_id,
                role="assistant",
                content=text,
                status="streaming",
                model_id=self.model.model_id,
                adapter_id=adapter or BASE_ADAPTER,
            )
        except (StorageError, NotFoundError):
            log.warning("could not save a partial reply of %s", conversation_id, exc_info=True)
            return message_id

    def mark_interrupted_streams(self) -> int:
        """Replies still `streaming` from a process that died: mark them interrupted."""
        with self.db.session() as s:
            rows = s.scalars(select(Message).where(Message.status == "streaming")).all()
            for message in rows:
                message.status = "interrupted"
                message.error = "The server stopped in the middle of this reply."
        if rows:
            log.warning("marked %d reply(ies) cut off by a stop as interrupted", len(rows))
        return len(rows)

    def _prompt(self, user_id: str, conversation_id: str) -> list[ChatMessage]:
        with self.db.session() as s:
            rows = s.scalars(
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .where(Message.status != "superseded")
                .order_by(Message.seq.desc())
                .limit(self.history_turns * 2)
            ).all()
        history = [ChatMessage(m.role, m.content) for m in reversed(rows) if m.content]  # type: ignore[arg-type]
        system = str(self._system)
        last_user = next((m.content for m in reversed(history) if m.role == "user"), "")
        block = self._memory_context(user_id, last_user)
        if block:
            system = f"{system}\n{block}"
        try:
            return fit_prompt(
                [ChatMessage("system", system), *history],
                self.model.count_tokens,
                self.prompt_budget,
            )
        except PromptTooLongError:
            # The memory block is what pushed it over: answer without it.
            plain = [ChatMessage("system", str(self._system)), *history]
            return fit_prompt(plain, self.model.count_tokens, self.prompt_budget)

    def _memory_enabled(self, user_id: str) -> bool:
        if self.memory is None:
            return False
        try:
            return self.memory.is_enabled(user_id)
        except Exception:
            log.warning("memory unavailable; chatting without it", exc_info=True)
            return False

    def _memory_context(self, user_id: str, query: str) -> str:
        if not self._memory_enabled(user_id):
            return ""
        try:
            return self.memory.context_block(  # type: ignore[union-attr]
                user_id, query, top_k=self.memory_top_k, token_budget=self.memory_token_budget
            )
        except Exception:
            log.warning("memory recall failed; chatting without it", exc_info=True)
            return ""

    def _greeting(self, user_id: str, conversation_id: str) -> tuple[list[ChatMessage], str]:
        """The greeting's prompt and its opener (a recalled fact; "" for a new user)."""
        facts = self._memory_facts(user_id)
        opener = recall_opener(facts, conversation_id)
        if opener:
            instruction = load_prompt("upc_greeting_recall").fill(
                profile=render_profile(facts), opener=opener
            )
        else:
            instruction = str(load_prompt("upc_greeting"))
        return [ChatMessage("system", f"{self._system}\n{instruction}")], opener

    def _memory_facts(self, user_id: str) -> list[MemoryFact]:
        if not self._memory_enabled(user_id):
            return []
        try:
            return self.memory.profile_facts(user_id)  # type: ignore[union-attr]
        except Exception:
            log.warning("memory profile failed; greeting without it", exc_info=True)
            return []

    def _remember_async(
        self, user_id: str, text: str, message_id: str, conversation_id: str
    ) -> None:
        if not self._memory_enabled(user_id):
            return

        def work() -> None:
            try:
                self.memory.remember(  # type: ignore[union-attr]
                    user_id, text, message_id=message_id, conversation_id=conversation_id
                )
            except Exception:
                log.warning("memory extraction failed", exc_info=True)

        # Synchronous: extraction is fast (rules + one embedding) and must finish before
        # the next turn reads memory; failures are logged, never raised into the chat.
        work()

    def _stream_reply(
        self, user_id: str, conversation_id: str, messages: list[ChatMessage], opener: str = ""
    ) -> Generator[ReplyEvent]:
        """Stream the model's reply (after ``opener``, a fixed first sentence) and store it."""
        adapter = self.adapter_for(conversation_id)
        pieces: list[str] = [opener + " "] if opener else []
        completion: Completion | None = None
        error: str | None = None
        started = flushed = time.perf_counter()
        partial_id: str | None = None
        stream = self.model.stream(messages, self.params, adapter=adapter)
        try:
            if opener:
                yield ReplyEvent("delta", opener + " ")
            while True:
                try:
                    piece = next(stream)
                except StopIteration as stop:
                    completion = stop.value
                    break
                pieces.append(piece)
                if time.perf_counter() - flushed >= _PARTIAL_FLUSH_S:
                    text = "".join(pieces).strip()
                    partial_id = self._save_partial(conversation_id, partial_id, text, adapter)
                    flushed = time.perf_counter()
                yield ReplyEvent("delta", piece)
        except ModelBusyError as exc:
            error = str(exc)
        except ModelError as exc:
            error = f"The model failed mid-reply: {exc}"
        finally:
            text = "".join(pieces).strip()
            if completion is not None and error is None and not text:
                error = "The model returned an empty reply."
            status = "complete" if completion is not None and error is None else "interrupted"
            if status == "interrupted" and error is None:
                error = "The reply was interrupted (the page was closed or reloaded)."
            message_id = partial_id
            fields = {
                "content": text,
                "status": status,
                "error": error,
                "model_id": completion.model_id if completion else self.model.model_id,
                "adapter_id": (completion.adapter_id if completion else adapter) or BASE_ADAPTER,
                "gen_params": self.params.to_dict(),
                "latency_ms": 1000 * (time.perf_counter() - started),
                "prompt_tokens": completion.prompt_tokens if completion else None,
                "completion_tokens": completion.completion_tokens if completion else None,
            }
            if partial_id is not None:
                self._update(partial_id, **fields)
            elif text or status == "interrupted":
                message_id = self._append(conversation_id, role="assistant", **fields)
            stream.close()
        if error is not None:
            yield ReplyEvent("error", error, message_id, status)
        else:
            yield ReplyEvent("done", text, message_id, status)


def _require_user(user_id: str) -> None:
    if not user_id:
        raise NotFoundError("no user")


def _title_from(text: str) -> str:
    line = " ".join(text.split())
    return line[:60] + ("…" if len(line) > 60 else "")
