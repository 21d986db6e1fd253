"""The learning jobs' tables: runs, controls, progress and the scheduler lease.

`JobRecords` reads and writes them for the scheduler, the worker and the `upc jobs` CLI;
`Lease` is the one-row lock that lets exactly one process schedule (`learner.scheduler`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from storage.db import Database
from storage.job_models import (
    JobControlRow,
    JobProgressRow,
    JobRunRow,
    SchedulerLeaseRow,
)
from storage.models import utcnow

__all__ = [
    "LEASE_NAME",
    "JobContext",
    "JobControl",
    "JobProgress",
    "JobRecords",
    "JobRun",
    "JobSpec",
    "Lease",
    "LeaseInfo",
    "describe_error",
]

LEASE_NAME = "learning-scheduler"


def describe_error(exc: BaseException) -> str:
    """`Type: message`, followed by the chain of causes (what an operator needs to see)."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)[:4000]


# ---------------------------------------------------------------------- records
@dataclass(frozen=True)
class JobRun:
    id: int
    job: str
    trigger: str
    holder: str
    status: str
    counts: dict[str, Any]
    error: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class JobControl:
    job: str
    paused: bool
    kind: str
    seconds: float
    cron: str
    source: str
    run_requested_at: datetime | None
    version: int


@dataclass(frozen=True)
class JobProgress:
    job: str
    run_id: int | None
    running: bool
    stage: str
    done: int
    total: int
    fraction: float
    message: str
    updated_at: datetime


@dataclass(frozen=True)
class LeaseInfo:
    holder: str | None
    expires_at: datetime
    acquired_at: datetime | None
    epoch: int

    @property
    def live(self) -> bool:
        return self.holder is not None and self.expires_at > utcnow()


@dataclass
class JobSpec:
    """A job: `func(ctx)` returns counts; `{"_status": "skipped"}` marks a no-op run."""

    name: str
    func: Callable[[JobContext], Mapping[str, Any] | None]
    seconds: float = 0.0  # interval; 0 and no cron: not scheduled (run on demand only)
    cron: str = ""
    executor: str = "default"  # "train": one at a time with the other training jobs
    description: str = ""

    @property
    def kind(self) -> str:
        return "cron" if self.cron else ("interval" if self.seconds > 0 else "off")


def _control(row: JobControlRow) -> JobControl:
    return JobControl(
        row.job,
        row.paused,
        row.kind,
        row.seconds,
        row.cron,
        row.source,
        row.run_requested_at,
        row.version,
    )


def _run(row: JobRunRow) -> JobRun:
    return JobRun(
        row.id,
        row.job,
        row.trigger,
        row.holder,
        row.status,
        dict(row.counts or {}),
        row.error,
        row.started_at,
        row.finished_at,
    )


class JobRecords:
    """Reads and writes the job tables; shared by the scheduler, the worker and the CLI."""

    def __init__(self, db: Database):
        self.db = db

    # controls ------------------------------------------------------------
    def ensure_control(self, spec: JobSpec) -> JobControl:
        """Create the control row from the spec, or follow the spec while the operator has
        not changed the schedule."""
        with self.db.session() as s:
            row = s.get(JobControlRow, spec.name)
            if row is None:
                row = JobControlRow(
                    job=spec.name, kind=spec.kind, seconds=spec.seconds, cron=spec.cron, version=1
                )
                s.add(row)
            elif row.source == "settings" and (row.kind, row.seconds, row.cron) != (
                spec.kind,
                spec.seconds,
                spec.cron,
            ):
                row.kind, row.seconds, row.cron = spec.kind, spec.seconds, spec.cron
                row.version += 1
                row.updated_at = utcnow()
            s.flush()
            return _control(row)

    def controls(self) -> dict[str, JobControl]:
        with self.db.session() as s:
            return {r.job: _control(r) for r in s.scalars(select(JobControlRow))}

    def _change(self, job: str, **values: Any) -> JobControl:
        with self.db.session() as s:
            row = s.get(JobControlRow, job)
            if row is None:
                known = ", ".join(sorted(r for r in s.scalars(select(JobControlRow.job)))) or "none"
                raise KeyError(f"no job {job!r} (known: {known}); start the worker once first")
            for key, value in values.items():
                setattr(row, key, value)
            row.version += 1
            row.updated_at = utcnow()
            s.flush()
            return _control(row)

    def set_paused(self, job: str, paused: bool) -> JobControl:
        return self._change(job, paused=paused)

    def set_schedule(
        self, job: str, *, seconds: float | None = None, cron: str | None = None
    ) -> JobControl:
        if (seconds is None) == (cron is None):
            raise ValueError("give either an interval or a cron expression")
        if cron is not None:
            CronTrigger.from_crontab(cron, timezone=UTC)  # raises ValueError when malformed
            return self._change(job, kind="cron", cron=cron, seconds=0.0, source="operator")
        assert seconds is not None
        if seconds < 0:
            raise ValueError("the interval must not be negative")
        kind = "interval" if seconds > 0 else "off"
        return self._change(job, kind=kind, seconds=float(seconds), cron="", source="operator")

    def request_run(self, job: str) -> JobControl:
        with self.db.session() as s:
            row = s.get(JobControlRow, job)
            if row is None:
                raise KeyError(f"no job {job!r}; start the worker once first")
            row.run_requested_at = utcnow()
            s.flush()
            return _control(row)

    def take_run_request(self, job: str, seen: datetime) -> bool:
        """Clear a run-now request once (compare-and-set on its timestamp)."""
        with self.db.session() as s:
            result = s.execute(
                update(JobControlRow)
                .where(JobControlRow.job == job, JobControlRow.run_requested_at == seen)
                .values(run_requested_at=None)
            )
            return result.rowcount == 1

    # runs ----------------------------------------------------------------
    def start_run(self, job: str, trigger: str, holder: str) -> int:
        with self.db.session() as s:
            row = JobRunRow(job=job, trigger=trigger, holder=holder, status="running", counts={})
            s.add(row)
            s.flush()
            run_id = row.id
            progress = s.get(JobProgressRow, job)
            if progress is None:
                progress = JobProgressRow(job=job)
                s.add(progress)
            progress.run_id, progress.running = run_id, True
            progress.stage, progress.done, progress.total = "starting", 0, 0
            progress.fraction, progress.message, progress.updated_at = 0.0, "", utcnow()
            return run_id

    def finish_run(
        self, run_id: int, status: str, counts: Mapping[str, Any], error: str | None
    ) -> None:
        with self.db.session() as s:
            row = s.get(JobRunRow, run_id)
            if row is None:
                return
            row.status, row.counts, row.error = status, dict(counts), error
            row.finished_at = utcnow()
            progress = s.get(JobProgressRow, row.job)
            if progress is not None and progress.run_id == run_id:
                progress.running = False
                progress.stage = status
                progress.message = (error or "")[:500]
                progress.updated_at = utcnow()

    def progress(
        self, job: str, run_id: int, stage: str, done: int, total: int, message: str
    ) -> None:
        with self.db.session() as s:
            s.execute(
                update(JobProgressRow)
                .where(JobProgressRow.job == job, JobProgressRow.run_id == run_id)
                .values(
                    stage=stage,
                    done=done,
                    total=total,
                    fraction=round(done / total, 4) if total else 0.0,
                    message=message[:500],
                    updated_at=utcnow(),
                )
            )

    def progress_rows(self) -> dict[str, JobProgress]:
        with self.db.session() as s:
            return {
                r.job: JobProgress(
                    r.job,
                    r.run_id,
                    r.running,
                    r.stage,
                    r.done,
                    r.total,
                    r.fraction,
                    r.message,
                    r.updated_at,
                )
                for r in s.scalars(select(JobProgressRow))
            }

    def runs(self, job: str | None = None, limit: int = 20) -> list[JobRun]:
        query = select(JobRunRow).order_by(JobRunRow.id.desc()).limit(limit)
        if job is not None:
            query = query.where(JobRunRow.job == job)
        with self.db.session() as s:
            return [_run(r) for r in s.scalars(query)]

    def interrupt_stale(self, holder: str) -> dict[str, int]:
        """Mark runs left 'running' by any other holder as interrupted; count them per job."""
        with self.db.session() as s:
            rows = s.scalars(
                select(JobRunRow).where(JobRunRow.status == "running", JobRunRow.holder != holder)
            ).all()
            out: dict[str, int] = {}
            for row in rows:
                row.status = "interrupted"
                row.error = f"the scheduler process {row.holder} stopped during the run"
                row.finished_at = utcnow()
                out[row.job] = out.get(row.job, 0) + 1
                progress = s.get(JobProgressRow, row.job)
                if progress is not None and progress.run_id == row.id:
                    progress.running, progress.stage = False, "interrupted"
            return out

    def lease(self, name: str = LEASE_NAME) -> LeaseInfo | None:
        with self.db.session() as s:
            row = s.get(SchedulerLeaseRow, name)
            if row is None:
                return None
            return LeaseInfo(row.holder, row.expires_at, row.acquired_at, row.epoch)


# ---------------------------------------------------------------------- lease
class Lease:
    """A time-limited lock row; acquire and renew are single compare-and-set UPDATEs."""

    def __init__(self, db: Database, holder: str, *, ttl_s: float = 60.0, name: str = LEASE_NAME):
        self.db = db
        self.holder = holder
        self.ttl = timedelta(seconds=ttl_s)
        self.name = name

    def _ensure_row(self) -> None:
        with self.db.session() as s:
            if s.get(SchedulerLeaseRow, self.name) is not None:
                return
        try:
            with self.db.session() as s:
                s.execute(
                    insert(SchedulerLeaseRow).values(
                        name=self.name, holder=None, expires_at=datetime(1970, 1, 1), epoch=0
                    )
                )
        except IntegrityError:
            pass  # another process created it first

    def try_acquire(self) -> bool:
        self._ensure_row()
        now = utcnow()
        table = SchedulerLeaseRow
        with self.db.session() as s:
            result = s.execute(
                update(table)
                .where(
                    table.name == self.name,
                    (table.holder.is_(None))
                    | (table.expires_at < now)
                    | (table.holder == self.holder),
                )
                .values(
                    holder=self.holder,
                    acquired_at=now,
                    renewed_at=now,
                    expires_at=now + self.ttl,
                    epoch=table.epoch + 1,
                )
            )
            return result.rowcount == 1

    def renew(self) -> bool:
        now = utcnow()
        table = SchedulerLeaseRow
        with self.db.session() as s:
            result = s.execute(
                update(table)
                .where(
                    table.name == self.name, table.holder == self.holder, table.expires_at >= now
                )
                .values(renewed_at=now, expires_at=now + self.ttl)
            )
            return result.rowcount == 1

    def release(self) -> None:
        table = SchedulerLeaseRow
        with self.db.session() as s:
            s.execute(
                update(table)
                .where(table.name == self.name, table.holder == self.holder)
                .values(holder=None, expires_at=utcnow())
            )


@dataclass
class JobContext:
    """Handed to a job: report progress, and check whether to stop early."""

    job: str
    run_id: int
    records: JobRecords
    stop_event: threading.Event

    def progress(self, stage: str, done: int = 0, total: int = 0, message: str = "") -> None:
        self.records.progress(self.job, self.run_id, stage, done, total, message)

    def should_stop(self) -> bool:
        return self.stop_event.is_set()
