"""Which critic scores what (`learner.critic.build_critic` makes them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CriticSettings"]


@dataclass
class CriticSettings:
    # The training critic scores Algorithm 1's replies and the curriculum's selection.
    critic: Literal["rubric", "llm", "embedding"] = "rubric"
    # The evaluation critic: never seen by training or selection; its id is in every report.
    eval_critic: Literal["spc", "rubric", "llm", "embedding"] = "spc"
