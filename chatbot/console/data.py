"""What the console reads and changes: adapters, comparisons, the A/B split, chat logs.

Usable (and testable) without the UI; user mistakes come back as `gr.Error` for the page.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from chatbot.adapters import ABSplit, load_ab_split, save_ab_split
from chatbot.console.records import (
    DIMS,
    AdapterRow,
    ArmStats,
    CompareSide,
    CompareTurn,
    ConversationRow,
    TurnView,
    fmt,
)
from chatbot.services import Services
from core.prompting import load_prompt
from core.types import BASE_ADAPTER, ChatMessage
from learner.critic import Critic, build_critic
from learner.records import CriticInput, Score
from learner.registry import AdapterRegistry
from personas.catalog import PersonaCatalog
from storage.corpus_models import DialogueRow
from storage.logged_models import LoggedTurnRow
from storage.models import Conversation, Feedback, Message, User

__all__ = ["ConsoleData"]

_COMPARE_TURNS = 3
_AB_SAMPLE = 40


class ConsoleData:
    """The serving side and the chat logs, on top of `Services`."""

    def __init__(self, services: Services):
        self.services = services
        self.settings = services.settings
        self.registry: AdapterRegistry = services.registry
        self._critic: Critic | None = None
        self._critic_lock = threading.Lock()
        self._compare_lock = threading.Lock()

    # -------------------------------------------------------------- adapters
    def adapter_rows(self) -> list[AdapterRow]:
        serving = self.services.adapters.active
        base_status = "serving" if serving == BASE_ADAPTER else "available"
        rows = [AdapterRow(BASE_ADAPTER, *(["-"] * 8), base_status)]
        for m in self.registry.list():
            gate = m.gate or {}
            means = (gate.get("candidate") or {}).get("means") or {}
            size = len(m.training_dialogue_ids) or (m.metrics or {}).get("examples")
            status = m.status + (" · serving" if m.id == serving else "")
            rows.append(
                AdapterRow(
                    id=m.id,
                    parent=m.parent_id or BASE_ADAPTER,
                    iteration=fmt(m.iteration),
                    created=(m.created_at or "")[:19].replace("T", " "),
                    training_set=fmt(size),
                    val_rel=fmt(means.get("rel")),
                    val_int=fmt(means.get("int")),
                    val_val=fmt(means.get("val")),
                    gate=("promoted" if gate.get("promote") else "not promoted") if gate else "-",
                    status=status,
                )
            )
        return rows

    def adapter_ids(self, *, include_base: bool = True, usable: bool = False) -> list[str]:
        ids = [BASE_ADAPTER] if include_base else []
        ids += [m.id for m in self.registry.list() if not (usable and m.status == "retired")]
        return ids

    def _ab(self) -> ABSplit | None:
        """The split the server routes by now (the file may be newer until the next sync)."""
        return self.services.adapters._ab

    def status_line(self) -> str:
        adapters = self.services.adapters
        swap = adapters.last_swap_s
        ab = self._ab()
        parts = [
            f"**Serving:** `{adapters.active}`",
            f"registry active: `{self.registry.active_id()}`",
        ]
        if swap is not None:
            parts.append(f"last hot-swap {1000 * swap:.0f} ms")
        if ab is not None:
            parts.append(f"A/B: {100 * ab.share:.0f}% → `{ab.candidate}`")
        if adapters.last_error:
            parts.append(f"⚠️ {adapters.last_error}")
        return " · ".join(parts)

    def activate(self, adapter_id: str) -> float:
        """Activate in the registry and hot-load now; returns the swap time in seconds."""
        registry = self.registry
        previous = registry.active_id()
        registry.activate(adapter_id, reason="activated in the operator console")
        try:
            return self.services.adapters.activate(adapter_id)
        except Exception:
            # The model could not load it: put the registry back so both agree.
            registry.activate(previous, reason=f"hot-load of {adapter_id} failed")
            raise

    def rollback(self) -> tuple[str, float]:
        target = self.registry.rollback(reason="rolled back in the operator console")
        return target, self.services.adapters.activate(target)

    def retire(self, adapter_id: str) -> None:
        if adapter_id == BASE_ADAPTER:
            raise gr.Error("The base model cannot be retired.")
        ab = load_ab_split(self.settings.adapters_dir)
        if ab is not None and ab.candidate == adapter_id:
            raise gr.Error("That adapter is the A/B candidate; turn the split off first.")
        self.registry.retire(adapter_id, reason="retired in the operator console")

    # -------------------------------------------------------------- critic
    def critic(self) -> Critic:
        with self._critic_lock:
            if self._critic is None:
                # The cheap embedding critic: the console must not load a judge model.
                memory = self.services.memory
                embedder = memory.embedder if memory is not None else None
                self._critic = build_critic(self.settings, None, embedder, kind="embedding")
            return self._critic

    def score(self, items: list[CriticInput]) -> list[Score]:
        return self.critic().score_batch(items) if items else []

    # -------------------------------------------------------------- compare
    def _generate(self, messages: list[ChatMessage], adapter_id: str) -> str:
        adapter = None if adapter_id == BASE_ADAPTER else adapter_id
        params = self.settings.generation.params()
        return self.services.chatbot_model.generate(messages, params, adapter=adapter).text

    @contextlib.contextmanager
    def _loaded(self, adapter_ids: list[str]) -> Iterator[None]:
        """Load adapters the model does not hold yet; unload them afterwards if unused."""
        model = self.services.chatbot_model
        loaded = getattr(model, "adapters", None)  # only the local backend holds adapters
        added: list[str] = []
        with self._compare_lock:
            try:
                for adapter_id in adapter_ids:
                    if adapter_id == BASE_ADAPTER or loaded is None or adapter_id in loaded:
                        continue
                    path = self.registry.verified_path(adapter_id)
                    model.load_adapter(adapter_id, path)  # type: ignore[attr-defined]
                    added.append(adapter_id)
                yield
            finally:
                ab = self._ab()
                for adapter_id in added:
                    busy = adapter_id == self.services.adapters.active or (
                        ab is not None and ab.candidate == adapter_id
                    )
                    if not busy:
                        model.unload_adapter(adapter_id)  # type: ignore[attr-defined]

    def compare_prompt(
        self, prompt: str, background: str, adapter_a: str, adapter_b: str
    ) -> list[CompareSide]:
        """One user message to two adapters; returns per side the reply and its scores."""
        text = (prompt or "").strip()
        if not text:
            raise gr.Error("Type a prompt to compare.")
        if len(text) > self.settings.limits.max_message_chars:
            raise gr.Error("That prompt is too long.")
        system = ChatMessage("system", load_prompt("upc_system"))
        out = []
        with self._loaded([adapter_a, adapter_b]):
            for adapter_id in (adapter_a, adapter_b):
                reply = self._generate([system, ChatMessage("user", text)], adapter_id)
                item = CriticInput("User", background or "", (("user", text),), reply)
                turn = CompareTurn(text, reply, self.score([item])[0])
                out.append(CompareSide(adapter_id, (turn,)))
        return out

    def dialogue_choices(self, limit: int = 50) -> list[tuple[str, str]]:
        with self.services.db.session() as s:
            rows = s.execute(
                select(DialogueRow.id, DialogueRow.persona_name)
                .where(DialogueRow.status == "done")
                .order_by(DialogueRow.created_at.desc())
                .limit(limit)
            ).all()
        return [(f"{name or '?'} · {did[:8]}", did) for did, name in rows]

    def compare_replay(self, dialogue_id: str, adapter_a: str, adapter_b: str) -> list[CompareSide]:
        """Replay a stored persona dialogue's user side; each adapter answers every turn."""
        with self.services.db.session() as s:
            row = s.get(DialogueRow, dialogue_id or "")
            if row is None:
                raise gr.Error("Pick a stored persona dialogue to replay.")
            user_turns = [row.user_intro] + [t.user_answer for t in row.turns if t.user_answer]
            greeting, persona_id, name = row.greeting, row.persona_id, row.persona_name
        background = self._persona_background(persona_id)
        system = ChatMessage("system", load_prompt("upc_system"))
        out = []
        with self._loaded([adapter_a, adapter_b]):
            for adapter_id in (adapter_a, adapter_b):
                history: list[tuple[str, str]] = [("assistant", greeting)]
                turns = []
                for user_text in user_turns[:_COMPARE_TURNS]:
                    history.append(("user", user_text))
                    msgs = [system] + [ChatMessage(r, c) for r, c in history]
                    reply = self._generate(msgs, adapter_id)
                    score = self.score([CriticInput(name, background, tuple(history), reply)])[0]
                    turns.append(CompareTurn(user_text, reply, score))
                    history.append(("assistant", reply))
                out.append(CompareSide(adapter_id, tuple(turns)))
        return out

    def _persona_background(self, persona_id: str) -> str:
        try:
            return PersonaCatalog.load(self.settings.data_dir).get(persona_id).background
        except (KeyError, LookupError, ValueError, OSError):
            return ""

    # -------------------------------------------------------------- A/B
    def set_ab(self, candidate: str, share: float) -> ABSplit | None:
        if not 0.0 <= share <= 1.0:
            raise gr.Error("The share is a percentage from 0 to 100.")
        split = None
        if candidate and share > 0:
            if candidate == self.services.adapters.active:
                raise gr.Error("The candidate is already the serving adapter.")
            if candidate != BASE_ADAPTER:
                manifest = self.registry.verify(candidate)
                if manifest.status == "retired":
                    raise gr.Error(f"{candidate} is retired.")
            split = ABSplit(candidate, share)
        self.services.adapters.set_ab(split)
        save_ab_split(self.settings.adapters_dir, split)
        return split

    def arm_stats(self) -> list[ArmStats]:
        """Like rates and critic means of logged replies, per adapter of the current split."""
        ab = load_ab_split(self.settings.adapters_dir)
        arms = [("control", self.services.adapters.active)]
        if ab is not None:
            arms.append(("candidate", ab.candidate))
        with self.services.db.session() as s:
            return [self._arm(s, arm, adapter_id) for arm, adapter_id in arms]

    def _arm(self, s: Session, arm: str, adapter_id: str) -> ArmStats:
        replies = s.scalar(
            select(func.count(Message.id)).where(
                Message.role == "assistant",
                Message.adapter_id == adapter_id,
                Message.status == "complete",
            )
        )
        rated = (
            select(func.count(Feedback.id))
            .join(Message, Message.id == Feedback.message_id)
            .where(Message.adapter_id == adapter_id)
        )
        likes = s.scalar(rated.where(Feedback.rating > 0)) or 0
        dislikes = s.scalar(rated.where(Feedback.rating < 0)) or 0
        scores = [sc for sc in self.score(_sample_replies(s, adapter_id)) if sc.scored]
        means = {
            d: (statistics.fmean(sc.value(d) for sc in scores) if scores else None) for d in DIMS
        }
        return ArmStats(
            arm=arm,
            adapter_id=adapter_id,
            replies=replies or 0,
            likes=likes,
            dislikes=dislikes,
            like_rate=(likes / (likes + dislikes)) if likes + dislikes else None,
            scored=len(scores),
            rel=means["rel"],
            int=means["int"],
            val=means["val"],
        )

    # -------------------------------------------------------------- dialogues
    def conversation_rows(self, user_filter: str = "", limit: int = 200) -> list[ConversationRow]:
        counts = (
            select(
                Message.conversation_id,
                func.count(Message.id).label("n"),
                func.sum(case((Message.status == "superseded", 1), else_=0)).label("regen"),
            )
            .group_by(Message.conversation_id)
            .subquery()
        )
        query = (
            select(
                Conversation, User.username, User.excluded_from_training, counts.c.n, counts.c.regen
            )
            .join(User, User.id == Conversation.user_id)
            .outerjoin(counts, counts.c.conversation_id == Conversation.id)
            .order_by(Conversation.updated_at.desc())
            .limit(limit)
        )
        if user_filter.strip():
            query = query.where(User.username.contains(user_filter.strip()))
        with self.services.db.session() as s:
            return [
                ConversationRow(
                    id=c.id,
                    user=name,
                    training="excluded" if excluded else "",
                    title=c.title,
                    updated=f"{c.updated_at:%Y-%m-%d %H:%M}",
                    messages=int(n or 0),
                    regenerations=int(regen or 0),
                )
                for c, name, excluded, n, regen in s.execute(query).all()
            ]

    def turns(self, conversation_id: str) -> tuple[str, list[TurnView]]:
        """Every message of a conversation (regenerated ones too), with critic scores."""
        with self.services.db.session() as s:
            conv = s.get(Conversation, conversation_id or "")
            if conv is None:
                raise gr.Error("No such conversation.")
            user = s.get(User, conv.user_id)
            msgs = s.scalars(
                select(Message).where(Message.conversation_id == conv.id).order_by(Message.seq)
            ).all()
            feedback: dict[str, list[str]] = {}
            for fb in s.scalars(
                select(Feedback).where(Feedback.message_id.in_([m.id for m in msgs]))
            ):
                label = ("👍" if fb.rating > 0 else "👎") + (f" {fb.reason}" if fb.reason else "")
                feedback.setdefault(fb.message_id, []).append(label)
            rows = [_Turn(m.id, m.seq, m.role, m.adapter_id, m.status, m.content) for m in msgs]
            user_id, username = user.id, user.username
        scores = self._turn_scores(rows, username, self._profile(user_id))
        views = []
        for i, row in enumerate(rows):
            sc = scores.get(i)
            views.append(
                TurnView(
                    seq=row.seq,
                    role=row.role,
                    adapter_id=row.adapter_id or "-",
                    status="regenerated (superseded)" if row.status == "superseded" else row.status,
                    content=row.content,
                    feedback=", ".join(feedback.get(row.id, [])),
                    rel=fmt(sc.rel) if sc else "",
                    int=fmt(sc.int) if sc else "",
                    val=fmt(sc.val) if sc else "",
                    reasons="; ".join(f"{k}: {v}" for k, v in sc.reasons.items()) if sc else "",
                )
            )
        return username, views

    def _profile(self, user_id: str) -> str:
        memory = self.services.memory
        if memory is None:
            return ""
        # The profile only helps the critic; a broken memory store must not hide the turns.
        with contextlib.suppress(Exception):
            return memory.profile(user_id) or ""
        return ""

    def _turn_scores(self, rows: list[_Turn], username: str, background: str) -> dict[int, Score]:
        """Per row index: the learner's logged critique, else a fresh critic score."""
        stored = self._logged_critiques([r.id for r in rows])
        items, index = [], []
        kept: list[tuple[str, str]] = []
        for i, row in enumerate(rows):
            if row.role == "assistant" and row.seq > 0 and row.content and row.id not in stored:
                items.append(CriticInput(username, background, tuple(kept[-8:]), row.content))
                index.append(i)
            if row.status != "superseded":
                kept.append((row.role, row.content))
        scores = dict(zip(index, self.score(items), strict=True))
        for i, row in enumerate(rows):
            if row.id in stored:
                scores[i] = stored[row.id]
        return scores

    def _logged_critiques(self, message_ids: list[str]) -> dict[str, Score]:
        """Scores the learner's logged-dialogue critique stored, with its regeneration."""
        if not message_ids:
            return {}
        out = {}
        with self.services.db.session() as s:
            rows = s.scalars(select(LoggedTurnRow).where(LoggedTurnRow.message_id.in_(message_ids)))
            for row in rows:
                score = Score.from_dict(row.original_score)
                if row.regenerated:
                    score.reasons = {
                        **score.reasons,
                        "regenerated": f"({row.status}) {row.regenerated[:200]}",
                    }
                if row.exclusion_reason:
                    score.reasons = {**score.reasons, "excluded": row.exclusion_reason}
                out[row.message_id] = score
        return out

    def user_choices(self) -> list[str]:
        with self.services.db.session() as s:
            return list(s.scalars(select(User.username).order_by(User.username).limit(1000)))

    def set_excluded(self, username: str, excluded: bool) -> str:
        with self.services.db.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is None:
                raise gr.Error("No such user.")
            user.excluded_from_training = bool(excluded)
        return f"{username}: {'excluded from' if excluded else 'included in'} training."

    def is_excluded(self, username: str) -> bool:
        with self.services.db.session() as s:
            return bool(
                s.scalar(select(User.excluded_from_training).where(User.username == username))
            )


@dataclass(frozen=True)
class _Turn:
    """One stored message, read out of its session."""

    id: str
    seq: int
    role: str
    adapter_id: str | None
    status: str
    content: str


def _sample_replies(s: Session, adapter_id: str) -> list[CriticInput]:
    """The adapter's latest complete replies, each with the six messages before it."""
    sample = s.scalars(
        select(Message)
        .where(
            Message.role == "assistant",
            Message.adapter_id == adapter_id,
            Message.status == "complete",
            Message.seq > 0,
        )
        .order_by(Message.created_at.desc())
        .limit(_AB_SAMPLE)
    ).all()
    items = []
    for m in sample:
        prior = s.scalars(
            select(Message)
            .where(
                Message.conversation_id == m.conversation_id,
                Message.seq < m.seq,
                Message.status != "superseded",
            )
            .order_by(Message.seq)
        ).all()
        history = tuple((p.role, p.content) for p in prior[-6:])
        items.append(CriticInput("User", "", history, m.content))
    return items
