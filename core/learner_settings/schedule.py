"""When the learning jobs run (`learner.scheduler`, `learner.worker`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ScheduleSettings"]


@dataclass
class ScheduleSettings:
    scheduler_enabled: bool = True
    curriculum_interval_minutes: int = 0  # 0 = off
    curriculum_cron: str = ""  # crontab expression; when set it replaces the interval
    curriculum_users: int = 0  # users per scheduled iteration (0: the generator's default)
    critique_interval_minutes: int = 5
    retrain_check_minutes: int = 10
    retrain_min_examples: int = 64
    scheduler_lease_seconds: int = 60
    scheduler_poll_seconds: float = 2.0
    misfire_grace_minutes: int = 60
