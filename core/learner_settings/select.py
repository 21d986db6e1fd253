"""Algorithm 2's curriculum selection (`learner.stages.select`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SelectSettings"]


@dataclass
class SelectSettings:
    # A turn is difficult if a final score is below alpha or fewer than beta dimensions
    # improved by regeneration (the reference code's 3 and 2).
    alpha: int = 3
    beta: int = 2
    holdout_ratio: float = 0.1
    # Never train on a reply the reply checks flag as unusable (cut off, feedback talk,
    # placeholders, role flip). The checks are English phrase lists: turn this off for
    # other languages, where they misfire.
    skip_flagged_targets: bool = True
    # No more than this share of training targets may open with the same three words.
    max_opener_share: float = 0.1
    # A DPO pair (chosen = best attempt, rejected = worst) needs this mean-score gap.
    pair_min_gap: float = 1.0
