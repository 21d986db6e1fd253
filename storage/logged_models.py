"""Tables of learning from real conversations: critiqued logged turns, what the poisoning
guard kept out, and the record of each erasure."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, utcnow

__all__ = ["ErasureRow", "GuardExclusionRow", "LoggedTurnRow"]


class LoggedTurnRow(Base):
    """One critiqued bot turn of a real conversation (counterfactual regeneration)."""

    __tablename__ = "logged_turns"
    __table_args__ = (
        Index("ix_logged_turns_user", "user_id"),
        Index("ix_logged_turns_status_export", "status", "exported_iteration"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The assistant message judged; unique: a turn is never critiqued twice.
    message_id: Mapped[str] = mapped_column(String(32), unique=True)
    conversation_id: Mapped[str] = mapped_column(String(32), index=True)
    # Kept for erasure only; exports carry the salted hash, never the id.
    user_id: Mapped[str] = mapped_column(String(32))
    user_hash: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    # accepted | rejected | unscored | excluded
    status: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[list] = mapped_column(JSON, default=list)  # messages before the reply
    original: Mapped[str] = mapped_column(Text, default="")
    original_score: Mapped[dict] = mapped_column(JSON, default=dict)
    regenerated: Mapped[str | None] = mapped_column(Text, nullable=True)
    regenerated_score: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    regenerations: Mapped[int] = mapped_column(Integer, default=0)
    final_reply: Mapped[str] = mapped_column(Text, default="")
    background_source: Mapped[str] = mapped_column(String(16), default="conversation")
    critic_model_id: Mapped[str] = mapped_column(String(200), default="")
    chatbot_model_id: Mapped[str] = mapped_column(String(200), default="")
    exclusion_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The training run (iteration) whose files include this turn; None = not yet exported.
    exported_iteration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class GuardExclusionRow(Base):
    """Something the poisoning guard kept out of training, with why."""

    __tablename__ = "guard_exclusions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(8))  # turn | user
    user_id: Mapped[str] = mapped_column(String(32), index=True)
    conversation_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    message_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    category: Mapped[str] = mapped_column(String(16))  # injection | abuse | user-share
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ErasureRow(Base):
    """An erasure that was carried out: only hashes and counts, never the erased content."""

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_hash: Mapped[str] = mapped_column(String(64))
    counts: Mapped[dict] = mapped_column(JSON, default=dict)
    flagged_adapters: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
