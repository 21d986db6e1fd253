"""Per-user background memory: the facts table (SQLite is the truth; Chroma is an index)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, new_id, utcnow

__all__ = ["DEFAULT_COLLECTION", "MEMORY_CATEGORIES", "MemoryFactHistoryRow", "MemoryFactRow"]

# The Chroma collection that indexes these facts (erasure deletes from it directly).
DEFAULT_COLLECTION = "upc_user_memory"

MEMORY_CATEGORIES = (
    "occupation",
    "education",
    "hobby",
    "family",
    "preference",
    "concern",
    "location",
    "other",
)


class MemoryFactRow(Base):
    __tablename__ = "memory_facts"
    __table_args__ = (
        Index("ix_memory_facts_user_key", "user_id", "key"),
        Index("ix_memory_facts_user_indexed", "user_id", "indexed"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    category: Mapped[str] = mapped_column(String(16))
    # Normalised slot: single-valued slots ("occupation", "location", ...) are replaced
    # by a newer contradicting fact; multi-valued ones ("hobby", ...) accumulate.
    key: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    # No foreign keys: a fact outlives the conversation it was learned in.
    source_message_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    source_conversation_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # float32 MiniLM vector: lets rebuild and the SQLite-only fallback work without re-embedding.
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    # False until the vector is confirmed in Chroma; unindexed facts are healed later.
    indexed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class MemoryFactHistoryRow(Base):
    """An earlier value of a one-valued slot ("lives in Lisbon"), kept when a newer
    contradicting fact ("moved to Porto") replaced it. Never recalled into prompts; deleted
    with the fact that replaced it and by erasure."""

    __tablename__ = "memory_fact_history"
    __table_args__ = (Index("ix_memory_fact_history_user_key", "user_id", "key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # The current fact that replaced this value (no foreign key: history outlives edits).
    replaced_by: Mapped[str] = mapped_column(String(32), index=True)
    category: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    source_message_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    source_conversation_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # When the old value was first learned, and when it was replaced.
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    replaced_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
