"""Tables of the embedded learning loop: scheduler lease, job runs and controls, live job
progress, critiqued logged turns, guard exclusions and erasure records."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, utcnow

__all__ = [
    "ErasureRow",
    "GuardExclusionRow",
    "JobControlRow",
    "JobProgressRow",
    "JobRunRow",
    "LoggedTurnRow",
    "SchedulerLeaseRow",
]


class SchedulerLeaseRow(Base):
    """One row per lease name; the holder is the only active scheduler until `expires_at`."""

    __tablename__ = "scheduler_lease"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(128), nullable=True)
    acquired_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    renewed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Bumped whenever the lease changes hands (a fencing token for diagnostics).
    epoch: Mapped[int] = mapped_column(Integer, default=0)


class JobRunRow(Base):
    """One run of a scheduled job: start, end, outcome, counts, error."""

    __tablename__ = "job_runs"
    __table_args__ = (Index("ix_job_runs_job_started", "job", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(16), default="schedule")  # schedule|manual|catch-up
    holder: Mapped[str] = mapped_column(String(128), default="")
    # running | success | skipped | failed | interrupted
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    counts: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class JobProgressRow(Base):
    """The live progress of a job's current (or last) run, polled by the UI and the CLI."""

    __tablename__ = "job_progress"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    running: Mapped[bool] = mapped_column(Boolean, default=False)
    stage: Mapped[str] = mapped_column(String(64), default="")
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    fraction: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class JobControlRow(Base):
    """The operator's wishes for a job (pause, schedule, run-now), applied by the active
    scheduler; `source` says whether the schedule still follows the settings."""

    __tablename__ = "job_controls"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    kind: Mapped[str] = mapped_column(String(16), default="interval")  # interval | cron | off
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    cron: Mapped[str] = mapped_column(String(120), default="")
    source: Mapped[str] = mapped_column(String(16), default="settings")  # settings | operator
    run_requested_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


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
