"""Two real app replicas (`upc serve`) and learning workers on one PostgreSQL database and one
shared data dir (issue 18): one active scheduler, failover after a kill -9 within the lease,
hot-load of a promoted adapter on both replicas, a chat turn acknowledged by one replica
readable from the other, the same A/B arm on both, and no job run twice."""

from __future__ import annotations

import hashlib
import itertools
import time

import httpx
import pytest
from gradio_client import Client
from sqlalchemy import select

from chatbot.adapters import ABSplit, save_ab_split
from learner.job_records import JobRecords
from learner.registry import AdapterRegistry
from storage import Database
from storage.job_models import JobRunRow
from storage.models import Message
from tests.cluster import Cluster, holder_pid, wait_for
from tests.test_hotswap import _random_lora

pytestmark = pytest.mark.slow

LEASE_S = 4
SHARE = 0.5


def _health(app) -> dict:
    return httpx.get(f"{app.base_url}/healthz", timeout=10).json()


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _holder_pid(records: JobRecords) -> int | None:
    lease = records.lease()
    return holder_pid(lease.holder) if lease is not None and lease.live else None


def _arm(conversation_id: str) -> str:
    """The arm the split must pick (the same hash rule, worked out independently)."""
    bucket = int(hashlib.sha256(conversation_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "two" if bucket < SHARE else "one"


@pytest.fixture
def cluster(tmp_path, tiny_model_dir, postgres):
    url = postgres.create_database()
    data_dir = tmp_path / "upc-data"
    db = Database(url, data_dir=data_dir)
    registry = AdapterRegistry(data_dir / "adapters", db)
    for seed, name in enumerate(("one", "two")):
        registry.import_dir(_random_lora(tiny_model_dir, tmp_path / name, seed), adapter_id=name)
    env = {
        "UPC_LEARNER__SCHEDULER_LEASE_SECONDS": str(LEASE_S),
        "UPC_LEARNER__SCHEDULER_POLL_SECONDS": "0.5",
        "UPC_LEARNER__CRITIQUE_INTERVAL_MINUTES": "1",
        "UPC_LEARNER__RETRAIN_CHECK_MINUTES": "1",
        "UPC_LEARNER__RETRAIN_MIN_EXAMPLES": "100000",
        "UPC_GENERATION__MAX_NEW_TOKENS": "6",
    }
    running = Cluster(tmp_path, data_dir, url, tiny_model_dir, env=env)
    yield running, db, registry
    running.stop()
    db.dispose()
    postgres.drop_database(url)


def test_two_replicas_and_a_killed_worker_on_one_postgres(cluster):
    cl, db, registry = cluster
    records = JobRecords(db)
    first = cl.add_worker(unit_s=1.0)  # critique and retrain checks every second
    wait_for(lambda: _holder_pid(records) == first.pid, 60)
    # The replicas run the embedded scheduler too: three contenders, one lease.
    a, b = cl.add_replicas(2, UPC_LEARNER__SCHEDULER_ENABLED="true")
    wait_for(lambda: len(records.runs("critique", limit=50)) >= 2, 30)
    assert _holder_pid(records) == first.pid

    # Promotion through the registry: both replicas hot-load it within 10 s.
    promoted = time.monotonic()
    registry.activate("one", reason="multi-replica test")
    wait_for(lambda: all(_health(r)["adapter"] == "one" for r in (a, b)), 10, step=0.2)
    hot_load_s = time.monotonic() - promoted
    save_ab_split(cl.data_dir / "adapters", ABSplit("two", SHARE))
    time.sleep(2.5)  # one adapter poll of every replica

    # A turn acknowledged by A is read back from B, and each conversation gets one arm on
    # both replicas.
    on_a = Client(a.base_url, verbose=False)
    bid, _, history, *_ = on_a.predict("", api_name="/load")
    conversations = []
    for n in range(3):
        if n:
            _, history, _ = on_a.predict(bid, api_name="/new_conversation")
        _, history, status, _ = on_a.predict(f"canary-{n} on A", history, bid, api_name="/send")
        assert status == ""
        on_b = Client(b.base_url, verbose=False)
        loaded = on_b.predict(bid, api_name="/load")
        cid = loaded[1]["value"]
        assert any(f"canary-{n} on A" in _text(m) for m in loaded[2])
        _, _, status, _ = on_b.predict(f"follow-up {n} on B", loaded[2], bid, api_name="/send")
        assert status == ""
        conversations.append(cid)
    with db.session() as s:
        for cid in conversations:
            arms = list(
                s.scalars(
                    select(Message.adapter_id)
                    .where(Message.conversation_id == cid, Message.role == "assistant")
                    .order_by(Message.seq)
                )
            )
            assert arms[-2:] == [_arm(cid)] * 2, (cid, arms)  # A's reply, then B's

    # kill -9 of the lease holder: a replica takes over within the lease timeout.
    killed_at = time.monotonic()
    first.kill()
    replicas = {a.process.pid, b.process.pid}
    wait_for(lambda: _holder_pid(records) in replicas, LEASE_S + 5, step=0.1)
    failover_s = time.monotonic() - killed_at
    new_holder = records.lease().holder
    replacement = cl.add_worker(unit_s=1.0)
    time.sleep(LEASE_S + 1)  # the replacement starts and stands by
    assert records.lease().holder == new_holder
    assert replacement.process.poll() is None

    with db.session() as s:
        runs = list(s.scalars(select(JobRunRow).order_by(JobRunRow.id)))
    pids = [holder_pid(r.holder) for r in runs]
    # Before the kill only the worker ran jobs; after it only the new holder; never two
    # runs of one job at once, and no catch-up for the same job twice.
    switch = pids.index(holder_pid(new_holder)) if holder_pid(new_holder) in pids else len(pids)
    assert set(pids[:switch]) == {first.pid} and set(pids[switch:]) <= {holder_pid(new_holder)}
    assert replacement.pid not in pids
    for job in {r.job for r in runs}:
        mine = [r for r in runs if r.job == job]
        assert sum(r.status == "running" for r in mine) <= 1
        assert sum(r.trigger == "catch-up" for r in mine) <= 1
        for earlier, later in itertools.pairwise(mine):
            assert earlier.finished_at is None or earlier.finished_at <= later.started_at
    assert hot_load_s <= 10 and failover_s <= LEASE_S + 5
