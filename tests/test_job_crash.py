"""SIGKILL the learning worker in the middle of the curriculum and retrain jobs.

On restart there must be exactly one catch-up run, no duplicated examples, and no
half-promoted adapter: the registry only ever holds verified, complete adapters and
ACTIVE never points at anything else.
"""

from __future__ import annotations

import json
import signal

import pytest
from sqlalchemy import func, select

from learner.job_records import JobRecords
from learner.registry import AdapterRegistry
from storage.adapter_models import TrainingRun
from storage.corpus_models import DialogueRow
from storage.db import Database
from tests.test_logged import seed_conversation
from tests.test_scheduler import _env, _settings, _start_worker, _stop, _wait

pytestmark = pytest.mark.slow

USERS = 3


def _learning_env(data_dir, tiny_model_dir, **extra) -> dict[str, str]:
    """A worker that runs one small curriculum iteration on the tiny model, slowly enough
    in training (many epochs) to be killed there."""
    return _env(
        data_dir,
        tiny_model_dir,
        UPC_USER_SIM__MODEL=str(tiny_model_dir),  # the tiny model in all three roles
        UPC_LEARNER__CURRICULUM_USERS=str(USERS),
        UPC_LEARNER__TURNS="2",
        UPC_LEARNER__ALPHA="1",  # every finished dialogue is easy: there is data to train on
        UPC_LEARNER__BETA="0",
        UPC_LEARNER__GATE_USERS="1",
        UPC_LEARNER__GATE_MARGIN="-5",  # promote, so the promote stage really runs
        UPC_LEARNER__GATE_TOLERANCE="1e9",  # a random model's checks are noise here
        UPC_LEARNER__LORA_RANK="4",
        UPC_LEARNER__MAX_SEQ_LEN="256",
        UPC_LEARNER__EPOCHS="8",  # a few seconds of training: long enough to be killed in
        # A random-weight model's replies are all flagged (cut off): train on them anyway,
        # this test is about crashes, not data quality.
        UPC_LEARNER__SKIP_FLAGGED_TARGETS="false",
        **{"UPC_LEARNER__CRITIQUE_INTERVAL_MINUTES": "100000", **extra},
    )


def _stage(records: JobRecords, job: str) -> str | None:
    progress = records.progress_rows().get(job)
    return progress.stage if progress is not None and progress.running else None


def _training_step(db: Database) -> int:
    with db.session() as s:
        steps = s.scalars(select(TrainingRun.step).where(TrainingRun.status == "running")).all()
    return max(steps, default=0)


def _assert_registry_whole(settings, db: Database) -> AdapterRegistry:
    registry = AdapterRegistry(settings.adapters_dir, db)
    for manifest in registry.list():
        registry.verify(manifest.id)  # raises on a missing or altered file
    assert not list(settings.adapters_dir.glob(".tmp*")), "a staging dir was left published"
    active = registry.active_id()
    assert active == "base" or registry.exists(active)
    return registry


def _run_worker_until(env, log_path, unit_s: float, condition, *, kill: bool) -> None:
    """Run a worker until `condition()` holds, then SIGKILL it (or stop it cleanly)."""
    proc = _start_worker(env, log_path, unit_s)
    try:
        _wait(condition, timeout=900, step=0.05)  # generous: CI machines may be loaded
    except AssertionError:
        raise AssertionError(log_path.read_text(errors="replace")[-3000:]) from None
    finally:
        _stop(proc, signal.SIGKILL if kill else signal.SIGTERM)


def _completed_catch_ups(records: JobRecords, job: str) -> int:
    """Catch-up runs that ran to their end (an interrupted one also gets a finish time)."""
    return sum(
        1
        for r in records.runs(job, limit=100)
        if r.trigger == "catch-up" and r.status not in ("running", "interrupted")
    )


def _restart_for_catch_up(env, log_path, records: JobRecords, job: str, expected) -> None:
    """Restart with an hour-long interval (the only run is the catch-up), wait for it to
    finish, stop cleanly, and check the job's whole run history."""
    _run_worker_until(
        env, log_path, 3600.0, lambda: _completed_catch_ups(records, job) >= 1, kill=False
    )
    statuses = _statuses(records, job)
    assert statuses == expected, log_path.read_text(errors="replace")[-3000:]


def _statuses(records: JobRecords, job: str) -> list[tuple[str, str]]:
    runs = records.runs(job, limit=100)
    return [(r.trigger, r.status) for r in reversed(runs) if r.status != "skipped"]


def _iteration_dialogues(db: Database) -> tuple[int, int, int]:
    """(rows, distinct users, finished) of the stored synthetic dialogues."""
    with db.session() as s:
        total = s.scalar(select(func.count(DialogueRow.id)))
        distinct = s.scalar(select(func.count(func.distinct(DialogueRow.persona_id))))
        done = s.scalar(select(func.count()).where(DialogueRow.status == "done"))
    return total, distinct, done


def test_killed_mid_generation_then_mid_training(data_dir, tiny_model_dir, tmp_path):
    """Kill 1 lands between dialogues, kill 2 in the resumed run's training; each restart
    makes exactly one catch-up run, and the last one finishes the same iteration."""
    env = _learning_env(
        data_dir,
        tiny_model_dir,
        UPC_LEARNER__CURRICULUM_INTERVAL_MINUTES="1",
        UPC_LEARNER__BATCH_SIZE="1",  # one dialogue after another, to be killed between them
    )
    settings = _settings(env)
    db = Database.from_settings(settings)
    records = JobRecords(db)
    run_dir = settings.runs_dir / "iter-001"

    def mid_generation():
        if _stage(records, "curriculum") != "generate":
            return False
        return 1 <= _iteration_dialogues(db)[2] < USERS

    def mid_training():
        return _stage(records, "curriculum") == "train" and _training_step(db) >= 1

    # 1. Killed between dialogues.
    _run_worker_until(env, tmp_path / "w1.log", 1.0, mid_generation, kill=True)
    assert _statuses(records, "curriculum") == [("schedule", "running")]  # as left by the dead
    assert _iteration_dialogues(db)[2] < USERS
    # 2. The catch-up resumes generation, then is killed while training.
    _run_worker_until(env, tmp_path / "w2.log", 3600.0, mid_training, kill=True)
    assert _iteration_dialogues(db) == (USERS, USERS, USERS)  # finished ones kept, none twice
    registry = _assert_registry_whole(settings, db)
    assert registry.list() == [] and registry.active_id() == "base"  # nothing half-promoted
    assert (run_dir / "adapter-staging").exists()  # the half-trained weights are only here
    # 3. The next catch-up finishes the iteration without generating again.
    _restart_for_catch_up(
        env,
        tmp_path / "w3.log",
        records,
        "curriculum",
        [("schedule", "interrupted"), ("catch-up", "interrupted"), ("catch-up", "success")],
    )
    assert _iteration_dialogues(db) == (USERS, USERS, USERS)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"] == ["generate", "select", "train", "gate", "promote", "hotload"]
    assert state["promoted"] and state["adapter_id"]
    ids = [json.loads(line)["dialogue_id"] for line in (run_dir / "sft.jsonl").open()]
    assert ids and len(ids) == len(set(ids))
    assert not (run_dir / "adapter-staging").exists()
    registry = _assert_registry_whole(settings, db)
    assert [m.id for m in registry.list()] == [state["adapter_id"]]
    assert registry.active_id() == state["adapter_id"]
    assert registry.get(state["adapter_id"]).metrics.get("steps")
    db.dispose()


def test_killed_mid_retrain_catches_up_once(data_dir, tiny_model_dir, tmp_path):
    env = _learning_env(
        data_dir,
        tiny_model_dir,
        UPC_LEARNER__CRITIQUE_INTERVAL_MINUTES="1",
        UPC_LEARNER__RETRAIN_CHECK_MINUTES="2",
        UPC_LEARNER__RETRAIN_MIN_EXAMPLES="4",
        UPC_LEARNER__ACCEPT_THRESHOLD="1",  # every critiqued turn becomes an example
    )
    settings = _settings(env)
    db = Database.from_settings(settings)
    records = JobRecords(db)
    for n in range(4):
        seed_conversation(db, f"user{n}")

    def mid_training():
        return _stage(records, "retrain") == "train" and _training_step(db) >= 1

    _run_worker_until(env, tmp_path / "w1.log", 1.0, mid_training, kill=True)
    assert _statuses(records, "retrain") == [("schedule", "running")]
    registry = _assert_registry_whole(settings, db)
    assert registry.list() == []
    # The killed run already claimed the examples, so the catch-up must finish it even
    # though no new examples are pending.
    _restart_for_catch_up(
        env,
        tmp_path / "w2.log",
        records,
        "retrain",
        [("schedule", "interrupted"), ("catch-up", "success")],
    )
    run_dir = settings.runs_dir / "iter-001"
    assert (run_dir / "kind").read_text() == "logged"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["adapter_id"] and state["done"][-1] == "hotload"
    lines = (run_dir / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 4 and len(lines) == len(set(lines))  # no example twice
    registry = _assert_registry_whole(settings, db)
    assert [m.id for m in registry.list()] == [state["adapter_id"]]
    db.dispose()
