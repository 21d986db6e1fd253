"""What the console reads and changes about learning: scheduled jobs and the plotted series.

The console only records an operator's wish for a job (`JobControlRow`); the active
scheduler applies it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from sqlalchemy import select

from chatbot.console.records import (
    DIMS,
    IterationRow,
    JobRunView,
    LossPoint,
    ScheduleRow,
)
from core.settings import Settings
from core.types import BASE_ADAPTER
from learner.registry import AdapterRegistry
from learner.train import TrainingStatusStore
from storage.corpus_models import RunRow, TurnRow
from storage.db import Database
from storage.job_models import JobControlRow, JobProgressRow
from storage.job_models import JobRunRow as JobRunRecord
from storage.models import utcnow

__all__ = ["JOBS", "LearnerData"]

JOBS = ("curriculum", "critique", "retrain")
_DONE = {"pause": "paused", "resume": "resumed", "run_now": "asked to run now"}


class LearnerData:
    """The learner's jobs, schedules, per-iteration results and training losses."""

    def __init__(self, db: Database, settings: Settings, registry: AdapterRegistry):
        self.db = db
        self.settings = settings
        self.registry = registry

    # -------------------------------------------------------------- jobs
    def job_names(self) -> list[str]:
        names = list(JOBS)
        with self.db.session() as s:
            for table in (JobControlRow, JobProgressRow):
                names += [n for n in s.scalars(select(table.job)) if n not in names]
        return names

    def learner_status(self) -> tuple[str, float]:
        """Markdown of the running (or last) jobs and the progress 0..1 of the current one."""
        lines = []
        progress = 0.0
        with self.db.session() as s:
            rows = s.scalars(
                select(JobProgressRow).order_by(JobProgressRow.updated_at.desc())
            ).all()
            for i, row in enumerate(rows):
                if i == 0 or row.running:
                    state = "**running**" if row.running else "idle"
                    lines.append(
                        f"**Job** `{row.job}` {state} · {row.stage or '-'} · "
                        f"{row.done}/{row.total} · {100 * (row.fraction or 0):.0f}% · "
                        f"{row.message or ''} · updated {row.updated_at:%Y-%m-%d %H:%M:%S}"
                    )
            running = [r for r in rows if r.running]
            if running:
                progress = float(running[0].fraction or 0.0)
        latest = TrainingStatusStore(self.db).latest()
        if latest is not None:
            if latest.status == "running" or not progress:
                progress = max(progress, float(latest.progress or 0.0))
            loss = "-" if latest.loss is None else f"{latest.loss:.4f}"
            lines.append(
                f"**Training** `{latest.run_id}` ({latest.stage}) **{latest.status}** · "
                f"step {latest.step}/{latest.total_steps} · "
                f"{100 * float(latest.progress or 0):.0f}% · loss {loss} · "
                f"updated {latest.updated_at:%Y-%m-%d %H:%M:%S}"
                + (f"\n\n⚠️ {latest.error}" if latest.error else "")
            )
        if not lines:
            lines.append("No learner job has run yet.")
        return "\n\n".join(lines), progress

    def job_history(self, limit: int = 50) -> list[JobRunView]:
        t = JobRunRecord
        with self.db.session() as s:
            runs = s.scalars(select(t).order_by(t.started_at.desc()).limit(limit)).all()
            return [
                JobRunView(
                    job=r.job,
                    trigger=r.trigger,
                    status=r.status,
                    started=f"{r.started_at:%Y-%m-%d %H:%M:%S}",
                    finished=f"{r.finished_at:%Y-%m-%d %H:%M:%S}" if r.finished_at else "-",
                    counts=json.dumps(r.counts or {}),
                    error=r.error or "",
                )
                for r in runs
            ]

    def _control(self, job: str, change: Callable[[JobControlRow], None]) -> None:
        """Record the operator's wish for a job; the active scheduler applies it."""
        if job not in self.job_names():
            raise gr.Error(f"Unknown job {job!r}.")
        with self.db.session() as s:
            row = s.get(JobControlRow, job)
            if row is None:
                row = JobControlRow(job=job, paused=False, version=0)
                s.add(row)
            change(row)
            row.version = (row.version or 0) + 1
            row.updated_at = utcnow()

    def job_action(self, action: str, job: str) -> str:
        def apply(row: JobControlRow) -> None:
            if action == "pause":
                row.paused = True
            elif action == "resume":
                row.paused = False
            elif action == "run_now":
                row.run_requested_at = utcnow()
            else:
                raise gr.Error(f"Unknown action {action!r}.")

        self._control(job, apply)
        return f"`{job}` {_DONE[action]}; the scheduler picks this up within seconds."

    def schedule_rows(self) -> list[ScheduleRow]:
        schedule = self.settings.learner.schedule
        defaults = {
            "curriculum": schedule.curriculum_interval_minutes,
            "critique": schedule.critique_interval_minutes,
        }
        with self.db.session() as s:
            controls = {
                row.job: (row.paused, row.kind, row.seconds, row.cron, row.source)
                for row in s.scalars(select(JobControlRow))
            }
        out = []
        for job in self.job_names():
            if job in controls:
                paused, kind, seconds, cron, source = controls[job]
                every = (
                    cron
                    if kind == "cron"
                    else ("off" if kind == "off" or not seconds else f"{seconds / 60:g} min")
                )
                out.append(ScheduleRow(job, "paused" if paused else "active", every, source))
            else:
                minutes = defaults.get(job)
                every = (
                    "on new examples"
                    if minutes is None
                    else (f"{minutes} min" if minutes else "off")
                )
                out.append(ScheduleRow(job, "active", every, "settings"))
        return out

    def set_schedule(self, job: str, minutes: float) -> str:
        if minutes < 0:
            raise gr.Error("Intervals are 0 (off) or more minutes.")

        def apply(row: JobControlRow) -> None:
            row.kind = "interval" if minutes else "off"
            row.seconds = float(minutes) * 60.0
            row.cron = ""
            row.source = "operator"

        self._control(job, apply)
        return f"`{job}`: every {minutes:g} min." if minutes else f"`{job}`: off."

    # -------------------------------------------------------------- plotted series
    def iteration_rows(self) -> list[IterationRow]:
        """Per iteration: easy and regeneration rates, validation rel/int/val.

        The corpus runs come first, then each iteration's `state.json`, then the registry's
        gate results fill what is still missing.
        """
        rows: dict[int, IterationRow] = {}
        with self.db.session() as s:
            for run in s.scalars(select(RunRow).order_by(RunRow.iteration)):
                stats = run.stats or {}
                rows[run.iteration] = IterationRow(
                    run.iteration, stats.get("easy_rate"), stats.get("regeneration_rate")
                )
        runs_dir = self.settings.runs_dir
        if runs_dir.is_dir():
            for state_file in sorted(runs_dir.glob("iter-*/state.json")):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    _merge_state(rows, state_file)
        for m in self.registry.list():
            if m.iteration is None or not m.gate:
                continue
            means = (m.gate.get("candidate") or {}).get("means") or {}
            row = rows.setdefault(m.iteration, IterationRow(m.iteration))
            for d in DIMS:
                if row.means.get(d) is None:
                    row.means[d] = means.get(d)
        return [rows[k] for k in sorted(rows)]

    def score_values(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {d: [] for d in DIMS}
        t = TurnRow
        with self.db.session() as s:
            for rel, int_, val in s.execute(select(t.final_rel, t.final_int, t.final_val)):
                for d, v in zip(DIMS, (rel, int_, val), strict=True):
                    if v is not None:
                        out[d].append(float(v))
        return out

    def loss_history(self, adapter_id: str) -> list[LossPoint]:
        if not adapter_id or adapter_id == BASE_ADAPTER:
            return []
        path = self.registry.path(adapter_id) / "loss.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(data, list):
            return []
        logged = [h for h in data if isinstance(h, dict) and "loss" in h]
        # A record without a step is drawn at its place in the log.
        return [
            LossPoint(h.get("step", i), h["loss"], str(h.get("stage", "sft")))
            for i, h in enumerate(logged)
        ]


def _merge_state(rows: dict[int, IterationRow], state_file: Path) -> None:
    """One iteration's `state.json`: its rates where the corpus had none, its gate means."""
    state: dict[str, Any] = json.loads(state_file.read_text(encoding="utf-8"))
    k = int(state["iteration"])
    stats = {**(state.get("generate_stats") or {}), **(state.get("select_stats") or {})}
    means = ((state.get("gate") or {}).get("candidate") or {}).get("means") or {}
    row = rows.setdefault(k, IterationRow(k))
    if row.easy_rate is None:
        row.easy_rate = stats.get("easy_rate")
    if row.regeneration_rate is None:
        row.regeneration_rate = stats.get("regeneration_rate")
    row.means.update({d: means.get(d) for d in DIMS})
