"""Learner tables: generation runs (one per iteration), dialogues, scored turns, curriculum."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from storage.models import Base, new_id, utcnow

__all__ = ["CurriculumRow", "DialogueRow", "RunRow", "TurnRow"]


class RunRow(Base):
    """One Algorithm 1 corpus generation; iteration K has exactly one run."""

    __tablename__ = "learn_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    iteration: Mapped[int] = mapped_column(Integer, unique=True)
    split: Mapped[str] = mapped_column(String(16), default="train")
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | done
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    chatbot_model_id: Mapped[str] = mapped_column(String(200), default="")
    adapter: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user_model_id: Mapped[str] = mapped_column(String(200), default="")
    critic_model_id: Mapped[str] = mapped_column(String(200), default="")
    prompt_versions: Mapped[dict] = mapped_column(JSON, default=dict)
    stats: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    tokens_chatbot: Mapped[int] = mapped_column(Integer, default=0)
    tokens_user: Mapped[int] = mapped_column(Integer, default=0)
    tokens_critic: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    dialogues: Mapped[list[DialogueRow]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="DialogueRow.position"
    )


class DialogueRow(Base):
    __tablename__ = "learn_dialogues"
    __table_args__ = (UniqueConstraint("run_id", "persona_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(ForeignKey("learn_runs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    persona_id: Mapped[str] = mapped_column(String(64))
    persona_name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|done|failed
    cause: Mapped[str | None] = mapped_column(Text, nullable=True)
    greeting: Mapped[str] = mapped_column(Text, default="")
    user_intro: Mapped[str] = mapped_column(Text, default="")
    chatbot_model_id: Mapped[str] = mapped_column(String(200), default="")
    user_model_id: Mapped[str] = mapped_column(String(200), default="")
    critic_model_id: Mapped[str] = mapped_column(String(200), default="")
    adapter: Mapped[str | None] = mapped_column(String(64), nullable=True)
    prompt_versions: Mapped[dict] = mapped_column(JSON, default=dict)
    tokens_chatbot: Mapped[int] = mapped_column(Integer, default=0)
    tokens_user: Mapped[int] = mapped_column(Integer, default=0)
    tokens_critic: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    run: Mapped[RunRow] = relationship(back_populates="dialogues")
    turns: Mapped[list[TurnRow]] = relationship(
        back_populates="dialogue", cascade="all, delete-orphan", order_by="TurnRow.turn_index"
    )


class TurnRow(Base):
    """One scored chatbot turn: first attempt, final reply, both scores, the user's answer."""

    __tablename__ = "learn_turns"
    __table_args__ = (UniqueConstraint("dialogue_id", "turn_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dialogue_id: Mapped[str] = mapped_column(
        ForeignKey("learn_dialogues.id", ondelete="CASCADE"), index=True
    )
    turn_index: Mapped[int] = mapped_column(Integer)
    user_message: Mapped[str] = mapped_column(Text, default="")
    first_reply: Mapped[str] = mapped_column(Text, default="")
    first_rel: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_int: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_val: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_score: Mapped[dict] = mapped_column(JSON, default=dict)
    final_reply: Mapped[str] = mapped_column(Text, default="")
    final_rel: Mapped[int | None] = mapped_column(Integer, nullable=True)
    final_int: Mapped[int | None] = mapped_column(Integer, nullable=True)
    final_val: Mapped[int | None] = mapped_column(Integer, nullable=True)
    final_score: Mapped[dict] = mapped_column(JSON, default=dict)
    regenerations: Mapped[int] = mapped_column(Integer, default=0)
    apology_retries: Mapped[int] = mapped_column(Integer, default=0)
    accepted: Mapped[bool] = mapped_column(Boolean, default=False)
    user_answer: Mapped[str] = mapped_column(Text, default="")
    # Every candidate (first try, resamples, regenerations) with scores and reply checks.
    attempts: Mapped[list] = mapped_column(JSON, default=list)
    final_finish_reason: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    dialogue: Mapped[DialogueRow] = relationship(back_populates="turns")


class CurriculumRow(Base):
    """The curriculum state after selecting iteration K's training set."""

    __tablename__ = "learn_curriculum"

    iteration: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("learn_runs.id", ondelete="CASCADE"))
    alpha: Mapped[int] = mapped_column(Integer)
    beta: Mapped[int] = mapped_column(Integer)
    easy_dialogue_ids: Mapped[list] = mapped_column(JSON, default=list)
    difficult_dialogue_ids: Mapped[list] = mapped_column(JSON, default=list)
    pending_persona_ids: Mapped[list] = mapped_column(JSON, default=list)
    ids_hash: Mapped[str] = mapped_column(String(64), default="")
    stats: Mapped[dict] = mapped_column(JSON, default=dict)
    output_dir: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
