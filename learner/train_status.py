"""The status row of a training run (stage, step, loss), written at most once a second,
which the console polls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from storage.adapter_models import TrainingRun
from storage.db import Database
from storage.models import utcnow

__all__ = ["TrainingStatus", "TrainingStatusStore"]


@dataclass(frozen=True)
class TrainingStatus:
    run_id: str
    iteration: int | None
    adapter_id: str | None
    stage: str
    status: str
    step: int
    total_steps: int
    progress: float
    loss: float | None
    error: str | None
    updated_at: Any


class TrainingStatusStore:
    """The status row of each training run, for the UI to poll."""

    def __init__(self, db: Database):
        self.db = db

    def start(
        self, run_id: str, *, iteration: int | None, adapter_id: str | None, total_steps: int
    ) -> None:
        with self.db.session() as session:
            row = session.get(TrainingRun, run_id) or TrainingRun(id=run_id)
            row.iteration = iteration
            row.adapter_id = adapter_id
            row.stage = "sft"
            row.status = "running"
            row.step = 0
            row.total_steps = total_steps
            row.progress = 0.0
            row.loss = None
            row.error = None
            row.started_at = row.updated_at = utcnow()
            session.add(row)

    def update(
        self,
        run_id: str,
        *,
        stage: str | None = None,
        step: int | None = None,
        total_steps: int | None = None,
        loss: float | None = None,
        status: str | None = None,
        error: str | None = None,
    ) -> None:
        with self.db.session() as session:
            row = session.get(TrainingRun, run_id)
            if row is None:
                return
            if stage is not None:
                row.stage = stage
            if total_steps is not None:
                row.total_steps = total_steps
            if step is not None:
                row.step = step
            if row.total_steps:
                row.progress = min(1.0, row.step / row.total_steps)
            if loss is not None:
                row.loss = loss
            if status is not None:
                row.status = status
                if status == "done":
                    row.progress = 1.0
            if error is not None:
                row.error = error
            row.updated_at = utcnow()

    def get(self, run_id: str) -> TrainingStatus | None:
        with self.db.session() as session:
            row = session.get(TrainingRun, run_id)
            return None if row is None else _status(row)

    def latest(self) -> TrainingStatus | None:
        with self.db.session() as session:
            row = session.scalars(
                select(TrainingRun).order_by(TrainingRun.updated_at.desc()).limit(1)
            ).first()
            return None if row is None else _status(row)


def _status(row: TrainingRun) -> TrainingStatus:
    return TrainingStatus(
        run_id=row.id,
        iteration=row.iteration,
        adapter_id=row.adapter_id,
        stage=row.stage,
        status=row.status,
        step=row.step,
        total_steps=row.total_steps,
        progress=row.progress,
        loss=row.loss,
        error=row.error,
        updated_at=row.updated_at,
    )


# --------------------------------------------------------------------------- data
