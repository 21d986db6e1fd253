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

from learner.registry import AdapterRegistry
from learner.scheduler import JobRecords
from storage.db import Database
from storage.learner_models import DialogueRow
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
        UPC_LEARNER__CURRICULUM_USERS=str(USERS),
        UPC_LEARNER__TURNS="2",
        UPC_LEARNER__ALPHA="1",  # every finished dialogue is easy: there is data to train on
        UPC_LEARNER__BETA="0",
        UPC_LEARNER__GATE_USERS="1",
        UPC_LEARNER__GATE_MARGIN="-5",  # promote, so the promote stage really runs
        UPC_LEARNER__LORA_RANK="4",
        UPC_LEARNER__MAX_SEQ_LEN="256",
        UPC_LEARNER__EPOCHS="40",
        UPC_LEARNER__CRITIQUE_INTERVAL_MINUTES="100000",
        **extra,
    )


def _stage(records: JobRecords, job: str) -> str | None:
    progress = records.progress_rows().get(job)
    return progress.stage if progress is not None and progress.running else None


def _training_step(db: Database) -> int:
    from storage.adapter_models import TrainingRun

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


def _crash_then_catch_up(env, tmp_path, job: str, killed_at, after_kill=None) -> JobRecords:
    """Start a worker with a 1 s interval, SIGKILL it once `killed_at(records)` holds, call
    `after_kill()`, then restart it with an hour-long interval, so that the only run it
    makes is the catch-up."""
    db = Database.from_settings(_settings(env))
    records = JobRecords(db)
    proc = _start_worker(env, tmp_path / f"{job}-1.log", 1.0)
    try:
        _wait(lambda: killed_at(records), timeout=240, step=0.05)
    finally:
        _stop(proc, signal.SIGKILL)
    left = [r.status for r in records.runs(job, limit=100) if r.status != "skipped"]
    assert left == ["running"]  # as the dead worker left it
    if after_kill is not None:
        after_kill()
    proc = _start_worker(env, tmp_path / f"{job}-2.log", 3600.0)
    try:
        _wait(
            lambda: any(r.trigger == "catch-up" and r.finished_at for r in records.runs(job)),
            timeout=400,
        )
    finally:
        _stop(proc)
    runs = records.runs(job, limit=100)
    log = (tmp_path / f"{job}-2.log").read_text(errors="replace")
    assert [r.status for r in runs if r.trigger == "catch-up"] == ["success"], log[-3000:]
    assert [r.status for r in runs if r.trigger != "catch-up" and r.status != "skipped"] == [
        "interrupted"
    ]
    return records


def _iteration_dialogues(db: Database) -> tuple[int, int]:
    with db.session() as s:
        total = s.scalar(select(func.count(DialogueRow.id)))
        distinct = s.scalar(select(func.count(func.distinct(DialogueRow.persona_id))))
    return total, distinct


def _sft_ids(run_dir) -> list[str]:
    lines = (run_dir / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["dialogue_id"] for line in lines if line.strip()]


def test_killed_mid_generation_resumes_without_duplicates(data_dir, tiny_model_dir, tmp_path):
    env = _learning_env(
        data_dir,
        tiny_model_dir,
        UPC_LEARNER__CURRICULUM_INTERVAL_MINUTES="1",
        UPC_LEARNER__BATCH_SIZE="1",  # one dialogue after another, to be killed between them
    )
    settings = _settings(env)
    db = Database.from_settings(settings)

    def mid_generation(records):
        if _stage(records, "curriculum") != "generate":
            return False
        with db.session() as s:
            done = s.scalar(select(func.count()).where(DialogueRow.status == "done"))
        return 1 <= done < USERS

    _crash_then_catch_up(env, tmp_path, "curriculum", mid_generation)
    total, distinct = _iteration_dialogues(db)
    assert total == distinct == USERS  # finished dialogues were kept, none redone twice
    state = json.loads((settings.runs_dir / "iter-001" / "state.json").read_text())
    assert state["done"] == ["generate", "select", "train", "gate", "promote", "hotload"]
    ids = _sft_ids(settings.runs_dir / "iter-001")
    assert ids and len(ids) == len(set(ids))
    registry = _assert_registry_whole(settings, db)
    assert [m.id for m in registry.list()] == [state["adapter_id"]]
    assert registry.active_id() == state["adapter_id"]
    db.dispose()


def test_killed_mid_training_never_serves_a_half_trained_adapter(
    data_dir, tiny_model_dir, tmp_path
):
    env = _learning_env(data_dir, tiny_model_dir, UPC_LEARNER__CURRICULUM_INTERVAL_MINUTES="1")
    settings = _settings(env)
    db = Database.from_settings(settings)

    run_dir = settings.runs_dir / "iter-001"
    before: dict = {}

    def mid_training(records):
        return _stage(records, "curriculum") == "train" and _training_step(db) >= 1

    def nothing_published():
        registry = _assert_registry_whole(settings, db)
        assert registry.list() == [] and registry.active_id() == "base"
        assert (run_dir / "adapter-staging").exists()  # half-trained weights are only here
        before["dialogues"] = _iteration_dialogues(db)

    records = _crash_then_catch_up(env, tmp_path, "curriculum", mid_training, nothing_published)
    runs = records.runs("curriculum", limit=100)
    assert [(r.trigger, r.status) for r in reversed(runs)] == [
        ("schedule", "interrupted"),
        ("catch-up", "success"),
    ]
    assert _iteration_dialogues(db) == before["dialogues"]  # generation was not redone
    state = json.loads((run_dir / "state.json").read_text())
    assert state["promoted"] and state["adapter_id"]
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
    for n in range(4):
        seed_conversation(db, f"user{n}")

    def mid_training(records):
        return _stage(records, "retrain") == "train" and _training_step(db) >= 1

    records = _crash_then_catch_up(env, tmp_path, "retrain", mid_training)
    run_dir = settings.runs_dir / "iter-001"
    assert (run_dir / "kind").read_text() == "logged"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["adapter_id"] and "generate" in state["done"]
    lines = (run_dir / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines and len(lines) == len(set(lines))  # no example twice in the training set
    registry = _assert_registry_whole(settings, db)
    assert [m.id for m in registry.list()] == [state["adapter_id"]]
    assert len([r for r in records.runs("retrain", limit=100) if r.trigger == "catch-up"]) == 1
    db.dispose()
