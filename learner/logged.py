"""Learning from logged real dialogues: critique, counterfactual regeneration, export.

A conversation is picked once it has been idle past ``idle_minutes``; users who opted out of
learning (``learning_opt_in=False``) or were excluded (``excluded_from_training``) are
skipped. Every bot turn after the greeting is checked by the poisoning guard, then scored by
the critic, whose user background is the memory profile of that user (or, when memory is
empty, what the user said in the conversation). Low-rated turns are regenerated as in
Algorithm 1 step 3 (same regeneration prompt, same apology rule); the user never sees this.

Each turn is stored once (``logged_turns.message_id`` is unique) with the original, its
scores, the regeneration, its scores and the provenance (conversation id, salted user hash,
critic and chatbot model). Accepted turns become SFT examples and preference pairs in the
curriculum's row format; `learner.logged_export` mixes them into a training run's files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from core.prompting import load_prompt
from core.settings import Settings
from core.types import ChatMessage, ChatModel, GenerationParams
from learner.critic import Critic
from learner.generate import is_apology, regeneration_request
from learner.guard import check_text, user_excluded
from learner.records import CriticInput, Score
from storage.db import Database
from storage.logged_models import GuardExclusionRow, LoggedTurnRow
from storage.models import Conversation, Message, User, utcnow

__all__ = [
    "LOGGED_PREFIX",
    "CritiqueCounts",
    "LoggedConfig",
    "LoggedLearner",
    "LoggedLearningError",
    "eligible_query",
    "load_salt",
    "pending_count",
    "user_hash",
]

log = logging.getLogger(__name__)

LOGGED_PREFIX = "logged-"
_BACKGROUND_CHARS = 1500
Progress = Callable[[str, int, int], None]


class LoggedLearningError(RuntimeError):
    """A critique run could not go on (e.g. the critic endpoint is down); the cause is kept."""


def load_salt(data_dir: Path) -> str:
    """The per-install salt of user hashes (created once, 0600, never exported)."""
    path = Path(data_dir) / "learner-salt.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(16))
    return path.read_text(encoding="utf-8").strip()


def user_hash(user_id: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{user_id}".encode()).hexdigest()[:32]


@dataclass
class LoggedConfig:
    idle_minutes: float = 30.0
    max_conversations: int = 50
    accept_threshold: int = 4
    max_regenerations: int = 3
    max_apology_retries: int = 3
    guard_user_threshold: float = 0.3
    guard_min_user_turns: int = 3
    chatbot_params: GenerationParams = field(default_factory=GenerationParams)
    adapter: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LoggedConfig:
        logged, generate = settings.learner.logged, settings.learner.generate
        return cls(
            idle_minutes=logged.idle_minutes,
            max_conversations=logged.logged_max_conversations,
            accept_threshold=generate.accept_threshold,
            max_regenerations=generate.max_regenerations,
            guard_user_threshold=logged.guard_user_threshold,
            guard_min_user_turns=logged.guard_min_user_turns,
            chatbot_params=GenerationParams(
                max_new_tokens=settings.generation.max_new_tokens, temperature=0.7
            ),
        )


@dataclass
class CritiqueCounts:
    conversations: int = 0
    turns: int = 0
    accepted: int = 0
    regenerated: int = 0
    rejected: int = 0
    unscored: int = 0
    excluded_turns: int = 0
    excluded_users: int = 0
    duplicates: int = 0

    def add(self, other: CritiqueCounts) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Turn:
    message_id: str
    seq: int
    prefix: list[dict[str, str]]
    original: str
    status: str = "pending"
    reason: str | None = None
    first: Score | None = None
    final_score: Score | None = None
    final_reply: str = ""
    regenerated: str | None = None
    regenerations: int = 0


class LoggedLearner:
    """Critiques finished real conversations into stored, exportable learning examples."""

    def __init__(
        self,
        db: Database,
        critic: Critic,
        chatbot: ChatModel | None,
        *,
        salt: str,
        config: LoggedConfig | None = None,
        profile: Callable[[str], str] | None = None,
    ):
        self.db = db
        self.critic = critic
        self.chatbot = chatbot
        self.salt = salt
        self.config = config or LoggedConfig()
        self.profile = profile
        self.system_prompt = str(load_prompt("upc_system"))

    # ---------------------------------------------------------------- picking
    def candidates(self) -> list[str]:
        """Idle conversations of eligible users that still hold an uncritiqued bot turn."""
        cutoff = utcnow() - timedelta(minutes=self.config.idle_minutes)
        last = (
            select(Message.conversation_id, func.max(Message.created_at).label("last_at"))
            .group_by(Message.conversation_id)
            .subquery()
        )
        done = select(LoggedTurnRow.message_id)
        open_turns = (
            select(Message.conversation_id)
            .where(
                Message.role == "assistant",
                Message.status == "complete",
                Message.seq > 0,
                Message.id.not_in(done),
            )
            .distinct()
        )
        query = (
            select(Conversation.id)
            .join(User, User.id == Conversation.user_id)
            .join(last, last.c.conversation_id == Conversation.id)
            .where(
                User.learning_opt_in.is_(True),
                User.excluded_from_training.is_(False),
                last.c.last_at < cutoff,
                Conversation.id.in_(open_turns),
            )
            .order_by(last.c.last_at)
            .limit(self.config.max_conversations)
        )
        with self.db.session() as s:
            return list(s.scalars(query))

    # ---------------------------------------------------------------- running
    def run(
        self,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CritiqueCounts:
        report = progress or (lambda _stage, _done, _total: None)
        ids = self.candidates()
        total = CritiqueCounts()
        report("critique", 0, len(ids))
        for n, conversation_id in enumerate(ids, 1):
            if should_stop is not None and should_stop():
                log.info("critique stopped early after %d conversations", n - 1)
                break
            total.add(self.process_conversation(conversation_id))
            report("critique", n, len(ids))
        return total

    def process_conversation(self, conversation_id: str) -> CritiqueCounts:
        counts = CritiqueCounts(conversations=1)
        with self.db.session() as s:
            conv = s.get(Conversation, conversation_id)
            if conv is None:
                return CritiqueCounts()
            user = s.get(User, conv.user_id)
            if user is None or not user.learning_opt_in or user.excluded_from_training:
                return CritiqueCounts()
            user_id = user.id
            rows = s.scalars(
                select(Message)
                .where(Message.conversation_id == conversation_id, Message.status == "complete")
                .order_by(Message.seq)
            ).all()
            messages = [(m.id, m.role, m.content) for m in rows]
            seen = set(
                s.scalars(
                    select(LoggedTurnRow.message_id).where(
                        LoggedTurnRow.conversation_id == conversation_id
                    )
                )
            )
        turns = self._turns(messages, seen)
        if not turns:
            return counts
        source = "none"
        if self._check_user(user_id):
            counts.excluded_users = 1
            for turn in turns:
                turn.status, turn.reason = "excluded", "user excluded by the poisoning guard"
        else:
            self._guard_turns(messages, turns, user_id, conversation_id)
            background, source = self._background(user_id, messages)
            self._critique([t for t in turns if t.status == "pending"], background)
        stored = self._store(turns, conversation_id, user_id, source)
        counts.duplicates = len(turns) - stored
        for turn in turns:
            counts.turns += 1
            counts.regenerated += int(turn.regenerations > 0)
            if turn.status == "accepted":
                counts.accepted += 1
            elif turn.status == "rejected":
                counts.rejected += 1
            elif turn.status == "unscored":
                counts.unscored += 1
            elif turn.status == "excluded":
                counts.excluded_turns += 1
        return counts

    # ---------------------------------------------------------------- pieces
    @staticmethod
    def _turns(messages: list[tuple[str, str, str]], seen: set[str]) -> list[_Turn]:
        out = []
        for i, (mid, role, content) in enumerate(messages):
            if role != "assistant" or i == 0 or messages[i - 1][1] != "user" or mid in seen:
                continue
            prefix = [{"role": r, "content": c} for _, r, c in messages[:i]]
            out.append(_Turn(mid, i, prefix, content))
        return out

    def _check_user(self, user_id: str) -> bool:
        """Apply the user-level rule over all of the user's messages; True = excluded now."""
        with self.db.session() as s:
            texts = list(
                s.scalars(
                    select(Message.content)
                    .join(Conversation, Conversation.id == Message.conversation_id)
                    .where(Conversation.user_id == user_id, Message.role == "user")
                )
            )
        flagged = sum(1 for t in texts if check_text(t).flagged)
        cfg = self.config
        if not user_excluded(
            flagged,
            len(texts),
            threshold=cfg.guard_user_threshold,
            min_turns=cfg.guard_min_user_turns,
        ):
            return False
        reason = (
            f"{flagged} of {len(texts)} user turns flagged "
            f"(share >= {cfg.guard_user_threshold:.2f})"
        )
        with self.db.session() as s:
            s.execute(update(User).where(User.id == user_id).values(excluded_from_training=True))
            s.execute(
                update(LoggedTurnRow)
                .where(LoggedTurnRow.user_id == user_id, LoggedTurnRow.exported_iteration.is_(None))
                .values(status="excluded", exclusion_reason="user excluded by the poisoning guard")
            )
            s.add(
                GuardExclusionRow(
                    scope="user", user_id=user_id, category="user-share", reason=reason
                )
            )
        log.warning("poisoning guard excluded a user from training: %s", reason)
        return True

    def _guard_turns(
        self,
        messages: list[tuple[str, str, str]],
        turns: list[_Turn],
        user_id: str,
        conversation_id: str,
    ) -> None:
        verdicts = {mid: check_text(content) for mid, role, content in messages if role == "user"}
        flagged_seqs = [
            i for i, (mid, _, _) in enumerate(messages) if mid in verdicts and verdicts[mid].flagged
        ]
        records = []
        for turn in turns:
            last_user_id = messages[turn.seq - 1][0]
            user_verdict = verdicts[last_user_id]
            reply_verdict = check_text(turn.original)
            if user_verdict.flagged:
                turn.status, turn.reason = "excluded", f"user message {user_verdict.reason}"
                category = user_verdict.category
            elif reply_verdict.flagged:
                turn.status, turn.reason = "excluded", f"reply {reply_verdict.reason}"
                category = reply_verdict.category
            elif any(i < turn.seq for i in flagged_seqs):
                turn.status, turn.reason = (
                    "excluded",
                    "an earlier message of the prefix was flagged",
                )
                category = (
                    "injection"
                    if any(verdicts[messages[i][0]].category == "injection" for i in flagged_seqs)
                    else "abuse"
                )
            else:
                continue
            records.append(
                GuardExclusionRow(
                    scope="turn",
                    user_id=user_id,
                    conversation_id=conversation_id,
                    message_id=turn.message_id,
                    category=category or "abuse",
                    reason=turn.reason or "",
                )
            )
        if records:
            with self.db.session() as s:
                s.add_all(records)

    def _background(self, user_id: str, messages: list[tuple[str, str, str]]) -> tuple[str, str]:
        profile = ""
        if self.profile is not None:
            try:
                profile = self.profile(user_id) or ""
            except Exception as exc:  # memory trouble must not stop learning; fall back
                log.warning("memory profile unavailable (%s); using the conversation", exc)
        if profile.strip():
            return profile.strip(), "memory"
        said = " ".join(c for _, r, c in messages if r == "user")
        return (
            f"What this person said in the conversation: {said[:_BACKGROUND_CHARS]}",
            "conversation",
        )

    def _score(self, items: list[CriticInput]) -> list[Score]:
        try:
            return self.critic.score_batch(items)
        except Exception as exc:
            raise LoggedLearningError(
                f"critic {self.critic.model_id} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _critique(self, turns: list[_Turn], background: str) -> None:
        if not turns:
            return
        items = [self._item(t, t.original, background) for t in turns]
        for turn, score in zip(turns, self._score(items), strict=True):
            turn.first = turn.final_score = score
            turn.final_reply = turn.original
        threshold = self.config.accept_threshold
        for _ in range(self.config.max_regenerations if self.chatbot is not None else 0):
            need = [
                t for t in turns if t.final_score is not None and t.final_score.failing(threshold)
            ]
            if not need:
                break
            fresh = self._regenerate(need)
            for t in need:
                t.regenerations += 1
            redo = [t for t in need if t.message_id in fresh]
            scores = self._score([self._item(t, fresh[t.message_id], background) for t in redo])
            for turn, score in zip(redo, scores, strict=True):
                turn.final_reply = turn.regenerated = fresh[turn.message_id]
                turn.final_score = score
        for turn in turns:
            score = turn.final_score
            if turn.first is None or not turn.first.scored or score is None or not score.scored:
                turn.status = "unscored"
            elif score.failing(threshold):
                turn.status = "rejected"
            else:
                turn.status = "accepted"

    @staticmethod
    def _item(turn: _Turn, reply: str, background: str) -> CriticInput:
        history = tuple((m["role"], m["content"]) for m in turn.prefix)
        return CriticInput(user_name="User", background=background, history=history, reply=reply)

    def _regenerate(self, turns: list[_Turn]) -> dict[str, str]:
        """One regeneration per turn (Algorithm 1 step 3); apologies are retried, then dropped."""
        assert self.chatbot is not None
        threshold = self.config.accept_threshold
        convs: dict[str, list[ChatMessage]] = {}
        for t in turns:
            assert t.final_score is not None
            last_user = t.prefix[-1]["content"]
            convs[t.message_id] = [
                ChatMessage("system", self.system_prompt),
                *(ChatMessage(m["role"], m["content"]) for m in t.prefix),  # type: ignore[arg-type]
                ChatMessage("assistant", t.final_reply),
                ChatMessage("user", regeneration_request(t.final_score, threshold, last_user)),
            ]
        out: dict[str, str] = {}
        pending = [t.message_id for t in turns]
        for _ in range(self.config.max_apology_retries + 1):
            if not pending:
                break
            completions = self.chatbot.generate_batch(
                [convs[mid] for mid in pending],
                self.config.chatbot_params,
                adapter=self.config.adapter,
            )
            still = []
            for mid, completion in zip(pending, completions, strict=True):
                text = completion.text.strip()
                if text and not is_apology(text):
                    out[mid] = text
                else:
                    still.append(mid)
            pending = still
        return out

    def _store(self, turns: list[_Turn], conversation_id: str, user_id: str, source: str) -> int:
        uhash = user_hash(user_id, self.salt)
        chatbot_id = getattr(self.chatbot, "model_id", "") if self.chatbot is not None else ""
        stored = 0
        for turn in turns:
            row = LoggedTurnRow(
                message_id=turn.message_id,
                conversation_id=conversation_id,
                user_id=user_id,
                user_hash=uhash,
                seq=turn.seq,
                status=turn.status,
                prefix=turn.prefix,
                original=turn.original,
                original_score=turn.first.to_dict() if turn.first else {},
                regenerated=turn.regenerated,
                regenerated_score=(
                    turn.final_score.to_dict()
                    if turn.regenerated is not None and turn.final_score
                    else None
                ),
                regenerations=turn.regenerations,
                final_reply=turn.final_reply or turn.original,
                background_source=source,
                critic_model_id=self.critic.model_id if turn.first else "",
                chatbot_model_id=chatbot_id if turn.regenerations else "",
                exclusion_reason=turn.reason,
            )
            try:
                with self.db.session() as s:
                    s.add(row)
                stored += 1
            except IntegrityError:
                log.info("turn %s was already critiqued (another worker); skipped", turn.message_id)
        return stored


# ---------------------------------------------------------------------- export
def eligible_query(iteration: int | None) -> Any:
    """Accepted turns of consenting users not yet exported (or exported to `iteration`)."""
    query = (
        select(LoggedTurnRow)
        .join(User, User.id == LoggedTurnRow.user_id)
        .where(
            LoggedTurnRow.status == "accepted",
            User.learning_opt_in.is_(True),
            User.excluded_from_training.is_(False),
        )
        .order_by(LoggedTurnRow.id)
    )
    if iteration is None:
        return query.where(LoggedTurnRow.exported_iteration.is_(None))
    return query.where(
        (LoggedTurnRow.exported_iteration.is_(None))
        | (LoggedTurnRow.exported_iteration == iteration)
    )


def pending_count(db: Database) -> int:
    """Accepted logged examples not yet exported to a training run."""
    with db.session() as s:
        return len(list(s.scalars(eligible_query(None))))
