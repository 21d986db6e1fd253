"""Several real app replicas (`upc serve`) and learning workers on one PostgreSQL database and
one shared data dir, for the multi-process test and the bench/ scripts of issue 18."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tests.conftest import REPO, RunningApp, make_app

__all__ = ["Cluster", "Worker", "holder_pid", "wait_for"]

T = TypeVar("T")

# A worker whose job intervals are `unit_s` seconds per configured minute (tests shrink it).
_WORKER = (
    "import logging,sys; logging.basicConfig(level=logging.INFO);"
    "from core.settings import load_settings; from learner.worker import run_worker;"
    "sys.exit(run_worker(load_settings(), unit_s=float(sys.argv[1])))"
)


def wait_for(predicate: Callable[[], T], timeout: float, step: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s")
        time.sleep(step)


def holder_pid(holder: str | None) -> int | None:
    """The process id in a scheduler lease holder (`host:pid:nonce`)."""
    return int(holder.split(":")[1]) if holder else None


@dataclass
class Worker:
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)


@dataclass
class Cluster:
    """Replicas and workers sharing `data_dir` and the database at `db_url`."""

    root: Path
    data_dir: Path
    db_url: str
    model_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    replicas: list[RunningApp] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    def base_env(self) -> dict[str, str]:
        return {
            "UPC_DATABASE_URL": self.db_url,
            "UPC_CHATBOT__MODEL": str(self.model_dir),
            "UPC_CRITIC__MODEL": str(self.model_dir),
            "UPC_MEMORY__ENABLED": "false",
            "UPC_AUTH__MODE": "anonymous",
            "UPC_SESSION_SECRET": "shared-cluster-secret-" + "7" * 16,
            "HF_HUB_OFFLINE": "1",
            **self.env,
        }

    def add_replicas(self, count: int, **env: str) -> list[RunningApp]:
        """Start `count` replicas at once; returns them when every /healthz answers."""
        apps = [
            make_app(self.data_dir, self.root, **{**self.base_env(), **env}) for _ in range(count)
        ]
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda app: app.start(), apps))
        self.replicas.extend(apps)
        return apps

    def add_worker(self, unit_s: float) -> Worker:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("UPC_")},
            "UPC_DATA_DIR": str(self.data_dir),
            "PYTHONUNBUFFERED": "1",
            **self.base_env(),
        }
        log = (self.root / f"worker-{len(self.workers)}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(unit_s)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = Worker(process)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.kill(signal.SIGTERM)
        for app in self.replicas:
            app.stop()
