"""The learning worker: the three jobs, and the two ways to run them.

- `upc worker` (`run_worker`) is a process of its own; it runs until SIGTERM/SIGINT.
- `start_embedded_scheduler(settings, db=..., models=..., chatbot=..., memory=...)` runs the
  same scheduler in a thread of the app process and returns it (call `.shutdown()` on exit).
  The jobs use the app's database, model pool, serving model and memory service, and run
  the stages of `learner.stages` through the iteration driver, as `upc learn` does.

Either way the database lease makes exactly one scheduler active, so an app started with an
embedded scheduler *and* a worker is safe: the second one stands by.

Jobs:
- ``curriculum``: one Algorithm 2 iteration (generate, select + logged mix, train, gate,
  promote); interval ``curriculum_interval_minutes`` or ``curriculum_cron``; off when both
  are unset (the demo-mode default). Runnable on demand with `upc jobs run curriculum`.
- ``critique``: critic-rated regeneration of logged dialogues (`learner.logged`).
- ``retrain``: when ``retrain_min_examples`` accepted logged examples are pending, a training
  run on them mixed with earlier synthetic data at ``real_data_ratio``, through the same gate.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from core.runtime import ModelPool
from core.settings import Settings
from core.types import ChatModel
from learner import stages
from learner.critic import Critic
from learner.curriculum import iteration_dir
from learner.iterate import STAGES, IterationDriver, build_driver, next_iteration
from learner.job_records import JobContext, JobSpec
from learner.logged import LoggedConfig, LoggedLearner, load_salt, pending_count
from learner.scheduler import LearningScheduler
from learner.stages import GenerationStats, LoopParts, Selection
from storage.db import Database

__all__ = [
    "JobResources",
    "ProfileSource",
    "build_job_specs",
    "run_worker",
    "start_embedded_scheduler",
]

log = logging.getLogger(__name__)

KIND_FILE = "kind"


class ProfileSource(Protocol):
    """Where the critic finds a user's background (the app's memory service)."""

    def profile(self, user_id: str) -> str: ...


@dataclass
class JobResources:
    """What the jobs use: the loop's shared parts, built on first use (a worker that never
    critiques loads no critic). An app hands in its own database, model pool and serving
    model, so the jobs load no second copy of a model."""

    settings: Settings
    db: Database | None = None
    models: ModelPool | None = None
    memory: ProfileSource | None = None
    chatbot: ChatModel | None = None
    _parts: LoopParts | None = field(default=None, repr=False)

    def parts(self) -> LoopParts:
        if self._parts is None:
            self._parts = LoopParts.from_settings(self.settings, db=self.db, pool=self.models)
            self.db, self.models = self._parts.db, self._parts.pool
        return self._parts

    def database(self) -> Database:
        return self.parts().db

    def chatbot_model(self) -> ChatModel:
        if self.chatbot is None:
            self.chatbot = self.parts().chatbot()
        return self.chatbot

    def critic_model(self) -> Critic:
        return self.parts().critic()

    def close(self) -> None:
        if self._parts is not None:
            self._parts.close()


def _logged_learner(res: JobResources) -> LoggedLearner:
    return LoggedLearner(
        res.database(),
        res.critic_model(),
        res.chatbot_model(),
        salt=load_salt(res.settings.data_dir),
        config=LoggedConfig.from_settings(res.settings),
        profile=res.memory.profile if res.memory is not None else None,
    )


def critique_job(res: JobResources) -> Callable[[JobContext], Mapping[str, Any]]:
    def run(ctx: JobContext) -> Mapping[str, Any]:
        learner = _logged_learner(res)
        counts = learner.run(progress=ctx.progress, should_stop=ctx.should_stop)
        return {**counts.to_dict(), "pending_examples": pending_count(res.database())}

    return run


def _read_kind(run_dir: Path) -> str | None:
    path = run_dir / KIND_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _driver(res: JobResources, kind: str, ctx: JobContext) -> IterationDriver:
    """The iteration driver over the shared parts, with this job's kind of data; reports
    each stage as progress. A ``logged`` iteration generates no corpus and trains on the
    pending logged examples (with earlier synthetic rows); a ``curriculum`` one mixes the
    pending logged examples into its selection."""
    settings = res.settings
    parts = res.parts()
    driver = build_driver(settings, parts)
    ratio = settings.learner.logged.real_data_ratio
    steps = driver.steps

    def generate(k: int, users: int | None) -> GenerationStats | None:
        return None if kind == "logged" else steps.generate(k, users)

    def select(k: int) -> Selection:
        if kind == "logged":
            return stages.select_logged(parts.db, settings.runs_dir, iteration=k, ratio=ratio)
        return stages.mix_logged(parts.db, steps.select(k), ratio=ratio)

    def on_stage(stage: str, k: int) -> None:
        ctx.progress(stage, STAGES.index(stage), len(STAGES), f"iteration {k} ({kind})")

    driver.steps = replace(steps, generate=generate, select=select)
    driver.on_stage = on_stage
    return driver


def _run_iteration(res: JobResources, kind: str, ctx: JobContext) -> dict[str, Any]:
    """Run the next iteration; an unfinished one is resumed first with its own kind."""
    k = next_iteration(res.settings.runs_dir)
    run_dir = iteration_dir(res.settings.runs_dir, k)
    existing = _read_kind(run_dir)
    actual = existing or kind
    driver = _driver(res, actual, ctx)
    run_dir.mkdir(parents=True, exist_ok=True)
    if existing is None:
        (run_dir / KIND_FILE).write_text(actual, encoding="utf-8")
    users = res.settings.learner.schedule.curriculum_users or None
    state = driver.run_iteration(k, users=users)
    ctx.progress("done", len(STAGES), len(STAGES), f"iteration {k}")
    return {
        "iteration": k,
        "kind": actual,
        "resumed_other_kind": actual != kind,
        "adapter": state.adapter_id,
        "promoted": state.promoted,
        "active_after": state.active_after,
        "note": state.note,
    }


def _unfinished_kind(res: JobResources) -> str | None:
    """The kind of the iteration that was started and not finished, if any."""
    runs_dir = res.settings.runs_dir
    return _read_kind(iteration_dir(runs_dir, next_iteration(runs_dir)))


def curriculum_job(res: JobResources) -> Callable[[JobContext], Mapping[str, Any]]:
    return lambda ctx: _run_iteration(res, "curriculum", ctx)


def retrain_job(res: JobResources) -> Callable[[JobContext], Mapping[str, Any]]:
    def run(ctx: JobContext) -> Mapping[str, Any]:
        pending = pending_count(res.database())
        needed = res.settings.learner.schedule.retrain_min_examples
        # An interrupted logged iteration has already claimed its examples: finish it.
        if pending < needed and _unfinished_kind(res) != "logged":
            return {"_status": "skipped", "pending_examples": pending, "needed": needed}
        return {**_run_iteration(res, "logged", ctx), "pending_examples": pending}

    return run


def build_job_specs(res: JobResources, *, unit_s: float = 60.0) -> list[JobSpec]:
    """The three jobs with their settings' schedules (`unit_s` seconds per minute; tests
    shrink it)."""
    schedule = res.settings.learner.schedule
    return [
        JobSpec(
            "curriculum",
            curriculum_job(res),
            seconds=0.0
            if schedule.curriculum_cron
            else schedule.curriculum_interval_minutes * unit_s,
            cron=schedule.curriculum_cron,
            executor="train",
            description="one curriculum iteration: generate, select, train, gate, promote",
        ),
        JobSpec(
            "critique",
            critique_job(res),
            seconds=schedule.critique_interval_minutes * unit_s,
            description="critique and regenerate logged real dialogues",
        ),
        JobSpec(
            "retrain",
            retrain_job(res),
            seconds=schedule.retrain_check_minutes * unit_s,
            executor="train",
            description="train on accepted logged examples once enough have gathered",
        ),
    ]


def _scheduler(settings: Settings, res: JobResources, unit_s: float) -> LearningScheduler:
    schedule = settings.learner.schedule
    return LearningScheduler(
        res.database(),
        build_job_specs(res, unit_s=unit_s),
        lease_ttl_s=schedule.scheduler_lease_seconds,
        poll_s=schedule.scheduler_poll_seconds,
        misfire_grace_s=int(schedule.misfire_grace_minutes * 60),
    )


def start_embedded_scheduler(
    settings: Settings,
    *,
    db: Database,
    models: ModelPool,
    chatbot: ChatModel | None = None,
    memory: ProfileSource | None = None,
    unit_s: float = 60.0,
) -> LearningScheduler:
    """Start the scheduler in this process on the app's database, model pool, serving model
    and memory (the jobs load no second copy of a model); `.shutdown()` stops it."""
    res = JobResources(settings, db=db, models=models, memory=memory, chatbot=chatbot)
    return _scheduler(settings, res, unit_s).start()


def run_worker(
    settings: Settings,
    *,
    db: Database | None = None,
    memory: ProfileSource | None = None,
    unit_s: float = 60.0,
    stop_event: threading.Event | None = None,
) -> int:
    """`upc worker`: run the scheduler until SIGTERM or SIGINT.

    ``memory`` (the app layer's memory service, or None) gives the critic user profiles;
    without it the critic falls back to the dialogue.
    """
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: stop.set())
    res = JobResources(settings, db=db, memory=memory)
    scheduler = _scheduler(settings, res, unit_s).start()
    log.info("learning worker %s started", scheduler.holder)
    try:
        # Short waits: the signal handler runs between them (a bare wait() may not wake).
        while not stop.wait(0.5):
            pass
    finally:
        scheduler.shutdown(wait=True)
        res.close()
        log.info("learning worker %s stopped", scheduler.holder)
    return 0
