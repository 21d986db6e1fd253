"""The learning worker: the three jobs, and the two ways to run them.

- `upc worker` (`run_worker`) is a process of its own; it runs until SIGTERM/SIGINT.
- `start_embedded_scheduler(settings, services)` runs the same scheduler in a thread of the
  app process and returns it (call `.shutdown()` on exit). It reuses the app's database,
  model pool and memory service.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from learner.scheduler import JobContext, JobSpec, LearningScheduler

__all__ = [
    "JobResources",
    "build_job_specs",
    "run_worker",
    "start_embedded_scheduler",
]

log = logging.getLogger(__name__)

KIND_FILE = "kind"


@dataclass
class JobResources:
    """What the jobs use, built lazily (a worker that never critiques loads no critic)."""

    settings: Any
    db: Any = None
    models: Any = None  # core.runtime.ModelPool
    memory: Any = None
    chatbot: Any = None
    critic: Any = None

    def database(self) -> Any:
        if self.db is None:
            from storage.db import Database

            self.db = Database.from_settings(self.settings)
        return self.db

    def model_pool(self) -> Any:
        if self.models is None:
            from core.runtime import ModelPool

            self.models = ModelPool(self.settings)
        return self.models

    def chatbot_model(self) -> Any:
        if self.chatbot is None:
            self.chatbot = self.model_pool().get(self.settings.chatbot)
        return self.chatbot

    def critic_model(self) -> Any:
        if self.critic is None:
            from learner.critic import build_critic

            model = None
            if self.settings.learner.critics.critic == "llm":
                model = self.model_pool().get(self.settings.critic)
            self.critic = build_critic(self.settings, model=model)
        return self.critic


def _logged_learner(res: JobResources) -> Any:
    from learner.logged import LoggedConfig, LoggedLearner, load_salt

    memory = res.memory
    return LoggedLearner(
        res.database(),
        res.critic_model(),
        res.chatbot_model(),
        salt=load_salt(res.settings.data_dir),
        config=LoggedConfig.from_settings(res.settings),
        profile=memory.profile if memory is not None and hasattr(memory, "profile") else None,
    )


def critique_job(res: JobResources) -> Callable[[JobContext], Mapping[str, Any]]:
    def run(ctx: JobContext) -> Mapping[str, Any]:
        from learner.logged import pending_count

        learner = _logged_learner(res)
        counts = learner.run(progress=ctx.progress, should_stop=ctx.should_stop)
        return {**counts.to_dict(), "pending_examples": pending_count(res.database())}

    return run


def _read_kind(run_dir: Path) -> str | None:
    path = run_dir / KIND_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _driver(res: JobResources, kind: str, ctx: JobContext) -> Any:
    """The iteration driver with this job's steps; reports each stage as progress."""
    from core.prompting import load_prompt
    from learner.iterate import STAGES, build_driver
    from learner.logged import build_logged_training_set, mix_into_training_set

    settings = res.settings
    driver = build_driver(settings, progress_bar=False)
    system_prompt = str(load_prompt("upc_system"))
    db = res.database()
    ratio = settings.learner.logged.real_data_ratio
    steps = driver.steps

    def generate(k: int, users: int | None) -> Mapping[str, Any]:
        if kind == "logged":
            return {"source": "logged"}
        return steps.generate(k, users)

    def select(k: int) -> Mapping[str, Any]:
        if kind == "logged":
            mix = build_logged_training_set(
                db, settings.runs_dir, k, ratio=ratio, system_prompt=system_prompt
            )
            return {"source": "logged", **asdict(mix)}
        stats = dict(steps.select(k))
        mix = mix_into_training_set(
            db, driver.run_dir(k), k, ratio=ratio, system_prompt=system_prompt
        )
        return {**stats, "logged_real": mix.real, "logged_pairs": mix.pairs_real}

    def on_stage(stage: str, k: int) -> None:
        ctx.progress(stage, STAGES.index(stage), len(STAGES), f"iteration {k} ({kind})")

    driver.steps = replace(steps, generate=generate, select=select)
    driver.on_stage = on_stage
    return driver


def _run_iteration(res: JobResources, kind: str, ctx: JobContext) -> dict[str, Any]:
    """Run the next iteration; an unfinished one is resumed first with its own kind."""
    from learner.curriculum import iteration_dir
    from learner.iterate import STAGES, next_iteration

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
    from learner.curriculum import iteration_dir
    from learner.iterate import next_iteration

    runs_dir = res.settings.runs_dir
    return _read_kind(iteration_dir(runs_dir, next_iteration(runs_dir)))


def curriculum_job(res: JobResources) -> Callable[[JobContext], Mapping[str, Any]]:
    return lambda ctx: _run_iteration(res, "curriculum", ctx)


def retrain_job(res: JobResources) -> Callable[[JobContext], Mapping[str, Any]]:
    def run(ctx: JobContext) -> Mapping[str, Any]:
        from learner.logged import pending_count

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
    learner = res.settings.learner.schedule
    return [
        JobSpec(
            "curriculum",
            curriculum_job(res),
            seconds=0.0
            if learner.curriculum_cron
            else learner.curriculum_interval_minutes * unit_s,
            cron=learner.curriculum_cron,
            executor="train",
            description="one curriculum iteration: generate, select, train, gate, promote",
        ),
        JobSpec(
            "critique",
            critique_job(res),
            seconds=learner.critique_interval_minutes * unit_s,
            description="critique and regenerate logged real dialogues",
        ),
        JobSpec(
            "retrain",
            retrain_job(res),
            seconds=learner.retrain_check_minutes * unit_s,
            executor="train",
            description="train on accepted logged examples once enough have gathered",
        ),
    ]


def _scheduler(settings: Any, res: JobResources, unit_s: float) -> LearningScheduler:
    learner = settings.learner.schedule
    return LearningScheduler(
        res.database(),
        build_job_specs(res, unit_s=unit_s),
        lease_ttl_s=learner.scheduler_lease_seconds,
        poll_s=learner.scheduler_poll_seconds,
        misfire_grace_s=int(learner.misfire_grace_minutes * 60),
    )


def start_embedded_scheduler(
    settings: Any, services_like: Any = None, *, unit_s: float = 60.0
) -> LearningScheduler:
    """Start the scheduler in this process, sharing the app's parts; `.shutdown()` stops it."""
    res = JobResources(
        settings,
        db=getattr(services_like, "db", None),
        models=getattr(services_like, "models", None),
        memory=getattr(services_like, "memory", None),
        chatbot=getattr(services_like, "chatbot_model", None),
    )
    return _scheduler(settings, res, unit_s).start()


def run_worker(
    settings: Any,
    *,
    db: Any = None,
    memory: Any = None,
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
        if res.models is not None:
            res.models.close()
        log.info("learning worker %s stopped", scheduler.holder)
    return 0
