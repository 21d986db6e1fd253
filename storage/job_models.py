"""Tables of the learning scheduler: its lease, job runs, live job progress and the
operator's job controls."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base, utcnow

__all__ = ["JobControlRow", "JobProgressRow", "JobRunRow", "SchedulerLeaseRow"]


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
