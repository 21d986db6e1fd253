"""The learning scheduler: APScheduler behind a database lease, so one process schedules.

Any number of processes (app replicas, `upc worker`s) may start a `LearningScheduler` on
the same database. Each one loops: while it does not hold the lease it tries to take it with
one compare-and-set UPDATE (free, expired, or already its own); while it holds it, it renews
it every ``poll_s`` and applies operator controls. Only the holder runs an APScheduler
`BackgroundScheduler`, whose job store is a `SQLAlchemyJobStore` on the same database, so
schedules and pauses survive restarts. A holder that crashes stops renewing; after
``lease_ttl_s`` another process takes over.

Jobs never overlap: `max_instances=1` per job, a per-job lock for manual runs, and the
training jobs share a one-thread executor. A missed run coalesces into one. Every run is a
`job_runs` row (start, end, outcome, counts, error) and updates its `job_progress` row.
Runs left "running" by a dead holder become "interrupted" and the job gets exactly one
catch-up run when the next holder starts.

Operators change jobs through `job_controls` (`JobRecords.set_paused` etc., used by
`upc jobs`); the active scheduler polls that table, so the CLI needs no connection to it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
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
    "LearningScheduler",
    "Lease",
    "LeaseInfo",
    "default_holder",
    "describe_error",
    "scheduled_job",
]

log = logging.getLogger(__name__)

LEASE_NAME = "learning-scheduler"
JOBSTORE_TABLE = "apscheduler_jobs"


def scheduled_job(name: str) -> None:
    """The callable stored in the job store; a `LearningScheduler` executor runs the job."""
    raise RuntimeError(f"job {name!r} must be run by a LearningScheduler executor")


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


# ---------------------------------------------------------------------- executor
@dataclass
class _JobProxy:
    """What APScheduler's `run_job` needs of a job, with our callable in place of the stored one."""

    id: str
    name: str
    misfire_grace_time: int | None
    func: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


class _DispatchExecutor(ThreadPoolExecutor):
    def __init__(self, run: Callable[[str, str], None], max_workers: int):
        super().__init__(max_workers)
        self._dispatch = run

    def _do_submit_job(self, job, run_times):  # type: ignore[no-untyped-def]
        name = job.args[0]
        trigger = "manual" if job.id.endswith("@manual") else "schedule"
        if job.id.endswith("@catch-up"):
            trigger = "catch-up"
        proxy = _JobProxy(
            job.id, job.name, job.misfire_grace_time, lambda: self._dispatch(name, trigger)
        )
        proxy._jobstore_alias = job._jobstore_alias  # type: ignore[attr-defined]
        super()._do_submit_job(proxy, run_times)


# ---------------------------------------------------------------------- scheduler
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


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class LearningScheduler:
    def __init__(
        self,
        db: Database,
        specs: list[JobSpec],
        *,
        holder: str | None = None,
        lease_ttl_s: float = 60.0,
        poll_s: float = 2.0,
        misfire_grace_s: int = 3600,
    ):
        self.db = db
        self.specs = {s.name: s for s in specs}
        self.holder = holder or default_holder()
        self.records = JobRecords(db)
        self.lease = Lease(db, self.holder, ttl_s=lease_ttl_s)
        self.poll_s = poll_s
        self.misfire_grace_s = misfire_grace_s
        self._aps: BackgroundScheduler | None = None
        self._applied: dict[str, int] = {}
        self._catch_up: set[str] = set()
        self._locks = {name: threading.Lock() for name in self.specs}
        self._stop = threading.Event()  # shutting down
        self._job_stop = threading.Event()  # running jobs should stop early
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self.became_active = threading.Event()

    @property
    def active(self) -> bool:
        return self._aps is not None

    # ------------------------------------------------------------- life cycle
    def start(self) -> LearningScheduler:
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._thread = threading.Thread(target=self._loop, name="upc-scheduler", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, wait: bool = True) -> None:
        self._stop.set()
        self._job_stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.poll_s * 3))
        self._deactivate("shutdown", wait=wait)
        self.lease.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.active:
                    if self.lease.try_acquire():
                        self._activate()
                elif not self.lease.renew():
                    log.warning("scheduler lease lost; standing by")
                    self._deactivate("lease lost", wait=False)
                else:
                    self._sync_controls()
            except Exception as exc:  # a DB hiccup must not kill the loop; retried next tick
                log.warning("scheduler loop error: %s", describe_error(exc))
            self._stop.wait(self.poll_s)

    def _activate(self) -> None:
        log.info("scheduler %s holds the lease; starting jobs", self.holder)
        executors = {
            "default": _DispatchExecutor(self.run_job, 4),
            "train": _DispatchExecutor(self.run_job, 1),
        }
        aps = BackgroundScheduler(
            jobstores={
                "default": SQLAlchemyJobStore(engine=self.db.engine, tablename=JOBSTORE_TABLE),
                "memory": MemoryJobStore(),
            },
            executors=executors,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": self.misfire_grace_s,
            },
            timezone=UTC,
        )
        aps.start(paused=True)
        self._job_stop = threading.Event()
        with self._state_lock:
            self._aps = aps
        self._applied.clear()
        interrupted = self.records.interrupt_stale(self.holder)
        for spec in self.specs.values():
            self._apply(spec, self.records.ensure_control(spec))
        for job, n in interrupted.items():
            if job in self.specs:
                log.warning("%d run(s) of %s were interrupted; one catch-up run follows", n, job)
                self._schedule_catch_up(job)
        aps.resume()
        self.became_active.set()

    def _deactivate(self, why: str, *, wait: bool) -> None:
        with self._state_lock:
            aps, self._aps = self._aps, None
        if aps is None:
            return
        self._job_stop.set()
        log.info("scheduler %s stops scheduling (%s)", self.holder, why)
        aps.pause()  # no new submissions while the executors shut down
        aps.shutdown(wait=wait)

    # ------------------------------------------------------------- controls
    @staticmethod
    def _trigger(control: JobControl) -> Any:
        if control.kind == "cron" and control.cron:
            return CronTrigger.from_crontab(control.cron, timezone=UTC)
        if control.kind == "interval" and control.seconds > 0:
            return IntervalTrigger(seconds=control.seconds, timezone=UTC)
        return None

    def _apply(self, spec: JobSpec, control: JobControl) -> None:
        aps = self._aps
        if aps is None:
            return
        trigger = self._trigger(control)
        existing = aps.get_job(spec.name, jobstore="default")
        if trigger is None:
            if existing is not None:
                aps.remove_job(spec.name, jobstore="default")
        elif existing is None:
            aps.add_job(
                scheduled_job,
                trigger,
                args=[spec.name],
                id=spec.name,
                name=spec.name,
                jobstore="default",
                executor=spec.executor,
                replace_existing=True,
            )
        elif str(existing.trigger) != str(trigger) or existing.executor != spec.executor:
            aps.modify_job(spec.name, jobstore="default", executor=spec.executor)
            aps.reschedule_job(spec.name, jobstore="default", trigger=trigger)
        job = aps.get_job(spec.name, jobstore="default")
        if job is not None:
            if control.paused and job.next_run_time is not None:
                aps.pause_job(spec.name, jobstore="default")
            elif not control.paused and job.next_run_time is None:
                aps.resume_job(spec.name, jobstore="default")
        self._applied[spec.name] = control.version

    def _sync_controls(self) -> None:
        for name, control in self.records.controls().items():
            spec = self.specs.get(name)
            if spec is None:
                continue
            if self._applied.get(name) != control.version:
                self._apply(spec, control)
            if control.run_requested_at is not None and self.records.take_run_request(
                name, control.run_requested_at
            ):
                self._submit_once(name, "manual")

    def _submit_once(self, name: str, trigger: str) -> None:
        aps = self._aps
        if aps is None:
            return
        aps.add_job(
            scheduled_job,
            "date",
            run_date=datetime.now(UTC),
            args=[name],
            id=f"{name}@{trigger}",
            name=f"{name} ({trigger})",
            jobstore="memory",
            executor=self.specs[name].executor,
            replace_existing=True,
            misfire_grace_time=None,
        )

    def _schedule_catch_up(self, name: str) -> None:
        """Exactly one catch-up: pull the scheduled run forward, or add a one-off run."""
        aps = self._aps
        assert aps is not None
        job = aps.get_job(name, jobstore="default")
        if job is not None and job.next_run_time is not None:
            self._catch_up.add(name)
            aps.modify_job(name, jobstore="default", next_run_time=datetime.now(UTC))
        else:
            self._submit_once(name, "catch-up")

    # ------------------------------------------------------------- running
    def run_job(self, name: str, trigger: str = "manual") -> JobRun:
        """Run one job now in this thread (waits for a running instance), recording it."""
        spec = self.specs[name]
        with self._locks[name]:
            if trigger == "schedule" and name in self._catch_up:
                self._catch_up.discard(name)
                trigger = "catch-up"
            run_id = self.records.start_run(name, trigger, self.holder)
            ctx = JobContext(name, run_id, self.records, self._job_stop)
            status, counts, error = "success", {}, None
            try:
                counts = dict(spec.func(ctx) or {})
                status = str(counts.pop("_status", "success"))
            except Exception as exc:  # the cause is recorded on the run; the scheduler goes on
                status, error = "failed", describe_error(exc)
                log.error("job %s (run %d) failed: %s", name, run_id, error)
            self.records.finish_run(run_id, status, counts, error)
            return self.records.runs(name, limit=1)[0]
