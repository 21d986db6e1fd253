"""Scheduler failover: two `upc worker` processes on a throwaway PostgreSQL; the lease holder
is killed with SIGKILL and the time until the other holds the lease is measured (target:
at most the lease timeout + 5 s). Each trial starts a replacement for the killed worker.

    python bench/scheduler_failover.py [--lease-s 10] [--trials 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._record import record
from learner.job_records import JobRecords
from storage import Database
from tests.cluster import Cluster, holder_pid, wait_for
from tests.servers import PostgresCluster


def _holder(records: JobRecords) -> int | None:
    lease = records.lease()
    return holder_pid(lease.holder) if lease is not None and lease.live else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lease-s", type=int, default=10)
    parser.add_argument("--poll-s", type=float, default=2.0)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    postgres = PostgresCluster().start()
    root = Path(tempfile.mkdtemp(prefix="upc-failover-"))
    url = postgres.create_database()
    db = Database(url, data_dir=root / "upc-data")
    records = JobRecords(db)
    cluster = Cluster(
        root,
        root / "upc-data",
        url,
        root / "no-model",  # the jobs find nothing to do; no model is loaded
        env={
            "UPC_LEARNER__SCHEDULER_LEASE_SECONDS": str(args.lease_s),
            "UPC_LEARNER__SCHEDULER_POLL_SECONDS": str(args.poll_s),
        },
    )
    failovers = []
    try:
        workers = [cluster.add_worker(unit_s=60.0) for _ in range(2)]
        for _ in range(args.trials):
            holder = wait_for(lambda: _holder(records), 120)
            # Let the holder renew a few times, as in steady state, then kill it.
            time.sleep(args.poll_s * 3)
            victim = next(w for w in workers if w.pid == holder)
            killed = time.monotonic()
            victim.kill()
            wait_for(
                lambda gone=holder: _holder(records) not in (None, gone), args.lease_s + 60, 0.05
            )
            failovers.append(round(time.monotonic() - killed, 2))
            workers = [w for w in workers if w is not victim] + [cluster.add_worker(60.0)]
    finally:
        cluster.stop()
        db.dispose()
        postgres.stop()
    record(
        "scheduler failover after kill -9 (2 workers, PostgreSQL)",
        {
            "lease_s": args.lease_s,
            "poll_s": args.poll_s,
            "failover_s": failovers,
            "max_s": max(failovers),
            "mean_s": round(statistics.mean(failovers), 2),
            "target_s": args.lease_s + 5,
            "met": max(failovers) <= args.lease_s + 5,
        },
    )


if __name__ == "__main__":
    main()
