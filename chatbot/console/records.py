"""The rows the console's tables and plots show, and how their cells are written."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from learner.records import Score

__all__ = [
    "DIMS",
    "AdapterRow",
    "ArmStats",
    "CompareSide",
    "CompareTurn",
    "ConversationRow",
    "IterationRow",
    "JobRunView",
    "LossPoint",
    "ScheduleRow",
    "TurnView",
    "fmt",
]

DIMS = ("rel", "int", "val")


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@dataclass(frozen=True)
class AdapterRow:
    id: str
    parent: str
    iteration: str
    created: str
    training_set: str
    val_rel: str
    val_int: str
    val_val: str
    gate: str
    status: str

    def cells(self) -> list[Any]:
        return list(asdict(self).values())


@dataclass(frozen=True)
class ArmStats:
    arm: str
    adapter_id: str
    replies: int
    likes: int
    dislikes: int
    like_rate: float | None
    scored: int
    rel: float | None
    int: float | None
    val: float | None

    def cells(self) -> list[Any]:
        return [
            self.arm,
            self.adapter_id,
            self.replies,
            self.likes,
            self.dislikes,
            fmt(self.like_rate),
            self.scored,
            fmt(self.rel),
            fmt(self.int),
            fmt(self.val),
        ]


@dataclass(frozen=True)
class TurnView:
    seq: int
    role: str
    adapter_id: str
    status: str
    content: str
    feedback: str
    rel: str
    int: str
    val: str
    reasons: str

    def cells(self) -> list[Any]:
        return list(asdict(self).values())


@dataclass(frozen=True)
class CompareTurn:
    user_text: str
    reply: str
    score: Score


@dataclass(frozen=True)
class CompareSide:
    """One adapter's answers in a side-by-side comparison."""

    adapter: str
    turns: tuple[CompareTurn, ...]


@dataclass
class IterationRow:
    """One learning iteration as the plots show it; filled from several sources."""

    iteration: int
    easy_rate: float | None = None
    regeneration_rate: float | None = None
    means: dict[str, float | None] = field(default_factory=dict)  # validation rel/int/val


@dataclass(frozen=True)
class LossPoint:
    step: int
    loss: float
    stage: str


@dataclass(frozen=True)
class JobRunView:
    job: str
    trigger: str
    status: str
    started: str
    finished: str
    counts: str
    error: str

    def cells(self) -> list[Any]:
        return list(asdict(self).values())


@dataclass(frozen=True)
class ScheduleRow:
    job: str
    state: str
    every: str
    set_by: str

    def cells(self) -> list[Any]:
        return list(asdict(self).values())


@dataclass(frozen=True)
class ConversationRow:
    id: str
    user: str
    training: str
    title: str
    updated: str
    messages: int
    regenerations: int

    def cells(self) -> list[Any]:
        return list(asdict(self).values())
