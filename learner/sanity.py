"""Evaluates a critic on the labelled sanity set: pairwise ranking accuracy per dimension.

Each case holds a persona, a short history and four replies: a user-centred reply with
substance (``good``) and three worse ones (``passive``, ``off_topic``, ``repetitive``). For
every dimension the good reply should score above each worse one; a tie counts one half,
and so does a pair where either reply is unscored (the critic gave no evidence).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from learner.critic import Critic
from learner.records import DIMENSIONS, CriticInput

__all__ = ["SanityCase", "SanityReport", "evaluate_critic", "load_sanity_cases"]

WORSE_KINDS = ("passive", "off_topic", "repetitive")


@dataclass(frozen=True)
class SanityCase:
    id: str
    name: str
    background: str
    history: tuple[tuple[str, str], ...]
    replies: dict[str, str]

    def item(self, kind: str) -> CriticInput:
        return CriticInput(self.name, self.background, self.history, self.replies[kind])


@dataclass
class SanityReport:
    critic_model_id: str
    cases: int
    pairs_per_dimension: int
    accuracy: dict[str, float] = field(default_factory=dict)
    accuracy_by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    unscored_replies: int = 0

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy) if self.accuracy else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_accuracy": self.mean_accuracy}


def load_sanity_cases(path: Path | None = None) -> list[SanityCase]:
    if path is None:
        text = resources.files("learner").joinpath("data", "critic_sanity.jsonl").read_text("utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    cases = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            cases.append(
                SanityCase(
                    id=raw["id"],
                    name=raw["persona"]["name"],
                    background=raw["persona"]["background"],
                    history=tuple((r, c) for r, c in raw["history"]),
                    replies=dict(raw["replies"]),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"sanity set line {line_no} is malformed: {exc}") from exc
    return cases


def evaluate_critic(
    critic: Critic, cases: list[SanityCase] | None = None, batch_cases: int = 8
) -> SanityReport:
    cases = load_sanity_cases() if cases is None else cases
    kinds = ("good", *WORSE_KINDS)
    wins = {d: {k: 0.0 for k in WORSE_KINDS} for d in DIMENSIONS}
    unscored = 0
    for start in range(0, len(cases), batch_cases):
        chunk = cases[start : start + batch_cases]
        items = [case.item(kind) for case in chunk for kind in kinds]
        scores = critic.score_batch(items)
        unscored += sum(1 for s in scores if not s.scored)
        for c in range(len(chunk)):
            by_kind = dict(zip(kinds, scores[c * len(kinds) : (c + 1) * len(kinds)], strict=True))
            for dim in DIMENSIONS:
                good = by_kind["good"].value(dim)
                for kind in WORSE_KINDS:
                    worse = by_kind[kind].value(dim)
                    if good is None or worse is None or good == worse:
                        wins[dim][kind] += 0.5
                    elif good > worse:
                        wins[dim][kind] += 1.0
    n = len(cases)
    return SanityReport(
        critic_model_id=critic.model_id,
        cases=n,
        pairs_per_dimension=n * len(WORSE_KINDS),
        accuracy={d: sum(wins[d].values()) / (n * len(WORSE_KINDS)) for d in DIMENSIONS},
        accuracy_by_kind={d: {k: wins[d][k] / n for k in WORSE_KINDS} for d in DIMENSIONS},
        unscored_replies=unscored,
    )
