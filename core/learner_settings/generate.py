"""Algorithm 1, critic-guided corpus generation (`learner.stages.generate`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GenerateSettings"]


@dataclass
class GenerateSettings:
    turns: int = 5
    max_regenerations: int = 3
    # A reply is accepted when every score reaches this (also the logged critique's bar).
    accept_threshold: int = 4
    # Plain resamples under the serving prompt, next to the critique-guided regenerations.
    best_of_n: int = 2
    batch_size: int = 16
