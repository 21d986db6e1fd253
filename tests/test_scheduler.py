"""The learning scheduler on real SQLite and PostgreSQL with real APScheduler: fast
intervals, controls, the lease, a single active scheduler among processes, crash and
catch-up, and a critic that is down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import func, select

from chatbot.chat import ChatService
from core.runtime import ModelPool
from core.settings import load_settings
from core.types import GenerationParams
from learner.job_records import JobRecords, JobSpec, Lease
from learner.scheduler import LearningScheduler
from learner.worker import JobResources, build_job_specs, start_embedded_scheduler
from storage.db import Database
from storage.logged_models import LoggedTurnRow
from tests.conftest import REPO, free_port
from tests.test_logged import DIALOGUE, seed_conversation, tiny_local  # noqa: F401


def _env(data_dir, tiny_model_dir, db_url: str | None = None, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPC_")}
    if db_url is not None and not db_url.startswith("sqlite"):
        env["UPC_DATABASE_URL"] = db_url
    env.update(
        {
            "UPC_DATA_DIR": str(data_dir),
            "UPC_CHATBOT__MODEL": str(tiny_model_dir),
            "UPC_CRITIC__MODEL": str(tiny_model_dir),
            "UPC_LEARNER__CRITIC": "llm",
            "UPC_MEMORY__ENABLED": "false",
            "UPC_GENERATION__MAX_NEW_TOKENS": "12",
            "UPC_LEARNER__SCHEDULER_LEASE_SECONDS": "3",
            "UPC_LEARNER__SCHEDULER_POLL_SECONDS": "0.3",
            "UPC_LEARNER__CRITIQUE_INTERVAL_MINUTES": "1",
            "UPC_LEARNER__RETRAIN_CHECK_MINUTES": "1",
            "UPC_LEARNER__RETRAIN_MIN_EXAMPLES": "100000",
            "UPC_LEARNER__MAX_REGENERATIONS": "1",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def _settings(env: dict[str, str]):
    return load_settings(env=env)


def _wait(predicate, timeout: float = 60.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


WORKER = (
    "import logging,sys; logging.basicConfig(level=logging.INFO);"
    "from core.settings import load_settings; from learner.worker import run_worker;"
    "sys.exit(run_worker(load_settings(), unit_s=float(sys.argv[1])))"
)


def _start_worker(env, log_path, unit_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(unit_s)],
        cwd=REPO,
        env=env,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)


def test_fast_interval_controls_and_persistence(db_url, data_dir, tiny_model_dir, tiny_local):  # noqa: F811
    settings = _settings(_env(data_dir, tiny_model_dir, db_url))
    assert settings.db_url == db_url
    db = Database.from_settings(settings)
    seed_conversation(db, "nurse")
    # The app's parts: the jobs use its pool and serving model, never a pool of their own.
    pool = ModelPool(settings)
    scheduler = start_embedded_scheduler(
        settings, db=db, models=pool, chatbot=tiny_local, unit_s=1.0
    )
    records = JobRecords(db)
    try:
        _wait(lambda: len([r for r in records.runs("critique") if r.status == "success"]) >= 2)
        _wait(lambda: any(r.status == "skipped" for r in records.runs("retrain")))
        first = records.runs("critique")[-1]
        assert first.counts["turns"] == 2 and first.trigger == "schedule"
        assert records.progress_rows()["critique"].stage in ("success", "critique", "starting")
        assert "curriculum" in records.controls()  # off by default: not scheduled
        assert scheduler.active and records.lease().holder == scheduler.holder
        # Pause: no more scheduled runs.
        records.set_paused("critique", True)
        time.sleep(1.5)
        count = len(records.runs("critique", limit=100))
        time.sleep(2.5)
        assert len(records.runs("critique", limit=100)) == count
        # Run now works on a paused job, and is recorded as manual.
        records.request_run("critique")
        _wait(lambda: records.runs("critique")[0].trigger == "manual")
        records.set_schedule("retrain", seconds=3600)
    finally:
        scheduler.shutdown()
        pool.close()
    # A fresh scheduler keeps the pause and the operator's schedule (persisted).
    again = LearningScheduler(
        db, build_job_specs(JobResources(settings, db=db), unit_s=1.0), lease_ttl_s=3, poll_s=0.3
    ).start()
    try:
        _wait(lambda: again.active)
        job = again._aps.get_job("critique", jobstore="default")
        assert job.next_run_time is None  # still paused
        assert "3600" in str(again._aps.get_job("retrain").trigger) or "1:00:00" in str(
            again._aps.get_job("retrain").trigger
        )
        assert records.controls()["retrain"].source == "operator"
    finally:
        again.shutdown()
    db.dispose()


def test_two_processes_one_active_scheduler(db_url, data_dir, tiny_model_dir, tmp_path):
    env = _env(data_dir, tiny_model_dir, db_url)
    db = Database.from_settings(_settings(env))
    seed_conversation(db, "nurse")
    procs = [_start_worker(env, tmp_path / f"w{i}.log", 1.0) for i in range(2)]
    records = JobRecords(db)
    try:
        _wait(lambda: len(records.runs("critique", limit=100)) >= 3, timeout=120)
        holders = {r.holder for r in records.runs(limit=200)}
        assert len(holders) == 1
        lease = records.lease()
        assert lease.live and lease.holder in holders
        active_pid = int(lease.holder.split(":")[1])
        active = next(p for p in procs if p.pid == active_pid)
        standby = next(p for p in procs if p.pid != active_pid)
        # The holder crashes: the other process takes over after the lease expires.
        _stop(active, signal.SIGKILL)
        _wait(lambda: records.lease().live and records.lease().holder != lease.holder, 30)
        new_holder = records.lease().holder
        assert int(new_holder.split(":")[1]) == standby.pid
        _wait(lambda: records.runs("critique")[0].holder == new_holder, 30)
    finally:
        for p in procs:
            _stop(p)
    assert (tmp_path / "w0.log").exists()
    db.dispose()


def test_crash_and_single_catch_up(data_dir, tiny_model_dir, tmp_path):
    env = _env(data_dir, tiny_model_dir, UPC_LEARNER__ACCEPT_THRESHOLD="5")
    db = Database.from_settings(_settings(env))
    for n in range(8):
        seed_conversation(db, f"user{n}")
    expected_turns = 8 * 2
    records = JobRecords(db)
    proc = _start_worker(env, tmp_path / "crash.log", 1.0)
    try:

        def mid_job():
            p = records.progress_rows().get("critique")
            return p is not None and p.running and p.done >= 2

        _wait(mid_job, timeout=120, step=0.05)
    finally:
        _stop(proc, signal.SIGKILL)
    with db.session() as s:
        before = s.scalar(select(func.count(LoggedTurnRow.id)))
    assert 0 < before < expected_turns
    # Restart with a long interval: the only critique run is the single catch-up.
    proc = _start_worker(env, tmp_path / "crash2.log", 3600.0)
    try:
        _wait(
            lambda: any(
                r.trigger == "catch-up" and r.status == "success" for r in records.runs("critique")
            ),
            timeout=300,
        )
        time.sleep(1.0)
    finally:
        _stop(proc)
    runs = records.runs("critique", limit=100)
    assert [r.status for r in runs if r.trigger == "catch-up"] == ["success"]
    assert [r.status for r in runs if r.trigger == "schedule"] == ["interrupted"]
    with db.session() as s:
        total = s.scalar(select(func.count(LoggedTurnRow.id)))
        distinct = s.scalar(select(func.count(func.distinct(LoggedTurnRow.message_id))))
    assert total == distinct == expected_turns  # no duplicated and no missing examples
    assert (
        not list((data_dir / "adapters").glob(".tmp-*"))
        if (data_dir / "adapters").exists()
        else True
    )
    db.dispose()


def test_critic_down_fails_cleanly_and_chat_goes_on(data_dir, tiny_model_dir, tiny_local):  # noqa: F811
    port = free_port()  # nothing listens there
    env = _env(
        data_dir,
        tiny_model_dir,
        UPC_CRITIC__BACKEND="openai",
        UPC_CRITIC__BASE_URL=f"http://127.0.0.1:{port}/v1",
        UPC_CRITIC__MODEL="judge",
        UPC_CRITIC__MAX_RETRIES="0",
    )
    settings = _settings(env)
    db = Database.from_settings(settings)
    user_id, _ = seed_conversation(db, "nurse")
    res = JobResources(settings, db=db, chatbot=tiny_local)
    specs = {s.name: s for s in build_job_specs(res, unit_s=3600)}
    scheduler = LearningScheduler(db, list(specs.values()), lease_ttl_s=3, poll_s=0.3)
    run = scheduler.run_job("critique")
    assert run.status == "failed"
    assert "critic llm-text:judge failed" in run.error and "Connection" in run.error
    with db.session() as s:
        assert s.scalar(select(func.count(LoggedTurnRow.id))) == 0  # nothing half-stored
    # Chat with the same chatbot model is unaffected.
    chat = ChatService(db, tiny_local, params=GenerationParams(max_new_tokens=8))
    conv = chat.create_conversation(user_id)
    events = list(chat.send(user_id, conv, "Hello there"))
    assert events and chat.messages(user_id, conv)[-1].role == "assistant"
    assert chat.messages(user_id, conv)[-1].status == "complete"
    db.dispose()


def test_failing_job_records_cause(db_url, data_dir):
    db = Database(db_url, data_dir=data_dir)

    def broken(ctx):
        ctx.progress("work", 1, 2)
        raise RuntimeError("disk full") from OSError("no space left")

    scheduler = LearningScheduler(db, [JobSpec("broken", broken, seconds=0)], poll_s=0.2)
    run = scheduler.run_job("broken")
    assert run.status == "failed" and "disk full" in run.error and "no space left" in run.error
    progress = JobRecords(db).progress_rows()["broken"]
    assert not progress.running and progress.stage == "failed"
    db.dispose()


@pytest.mark.parametrize("bad", ["not a cron", "61 * * * *"])
def test_bad_cron_is_refused(db_url, data_dir, bad):
    db = Database(db_url, data_dir=data_dir)
    records = JobRecords(db)
    records.ensure_control(JobSpec("x", lambda ctx: {}, seconds=60))
    with pytest.raises(ValueError):
        records.set_schedule("x", cron=bad)
    assert records.controls()["x"].kind == "interval"
    db.dispose()


def test_lease_has_one_holder_and_passes_on_after_expiry(db_url, data_dir):
    db = Database(db_url, data_dir=data_dir)
    leases = [Lease(db, f"replica-{i}", ttl_s=1.0) for i in range(6)]
    won: list[str] = []
    start = threading.Barrier(len(leases))

    def contend(lease: Lease) -> None:
        start.wait()
        if lease.try_acquire():
            won.append(lease.holder)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1  # a compare-and-set: concurrent takers never both win
    holder = next(lease for lease in leases if lease.holder == won[0])
    other = next(lease for lease in leases if lease.holder != won[0])
    assert holder.renew() and not other.try_acquire()
    epoch = JobRecords(db).lease().epoch
    time.sleep(1.2)  # the holder stops renewing, as a killed process would
    assert other.try_acquire() and not holder.renew()
    taken = JobRecords(db).lease()
    assert taken.holder == other.holder and taken.epoch == epoch + 1
    other.release()
    assert JobRecords(db).lease().holder is None
    db.dispose()
