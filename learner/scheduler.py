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
The tables and the lease are `learner.job_records`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from learner.job_records import (
    JobContext,
    JobControl,
    JobRecords,
    JobRun,
    JobSpec,
    Lease,
    describe_error,
)
from storage.db import Database

__all__ = [
    "LearningScheduler",
    "default_holder",
    "scheduled_job",
]

log = logging.getLogger(__name__)

JOBSTORE_TABLE = "apscheduler_jobs"


def scheduled_job(name: str) -> None:
    """The callable stored in the job store; a `LearningScheduler` executor runs the job."""
    raise RuntimeError(f"job {name!r} must be run by a LearningScheduler executor")


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
