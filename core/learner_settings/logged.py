"""Learning from logged real dialogues and the poisoning guard (`learner.logged`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LoggedSettings"]


@dataclass
class LoggedSettings:
    # A conversation idle this long is critiqued.
    idle_minutes: int = 30
    logged_max_conversations: int = 50  # per critique run
    # Share of real (logged) examples in a training set that mixes them with synthetic ones.
    real_data_ratio: float = 0.5
    guard_user_threshold: float = 0.3  # share of flagged user turns that excludes a user
    guard_min_user_turns: int = 3
