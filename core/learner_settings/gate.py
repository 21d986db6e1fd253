"""The promotion gate (`learner.stages.gate`, `learner.gate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["GateSettings"]


@dataclass
class GateSettings:
    # The gate's critic ("eval": the evaluation critic, on validation users).
    gate_critic: Literal["eval", "spc", "rubric", "llm", "embedding"] = "eval"
    gate_users: int = 10
    gate_seeds: int = 2
    gate_seed: int = 1234
    # The paired 95% lower bound of the gain must exceed this.
    gate_margin: float = 0.0
    # Critic-free checks may not regress more than this (relative) for a promotion.
    gate_tolerance: float = 0.10
