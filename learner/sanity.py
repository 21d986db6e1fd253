"""Evaluates a critic on the labelled sanity sets.

The sanity set: each case holds a persona, a short history and four replies: a user-centred
reply with substance (``good``) and three worse ones (``passive``, ``off_topic``,
``repetitive``). For every dimension the good reply should score above each worse one; a tie
counts one half, and so does a pair where either reply is unscored (the critic gave no
evidence).

The adversarial set: each context holds one good reply and eight replies that game a critic
(``GAMING_KINDS``). The good reply should have the higher mean of rel / int / val (expected
values where the critic gives them); ties and unscored pairs count one half. Contexts are
split into a ``dev`` half (the one looked at while building a critic) and a ``heldout`` half.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from learner.critic import Critic
from learner.records import DIMENSIONS, CriticInput, Score

__all__ = [
    "GAMING_KINDS",
    "AdversarialCase",
    "AdversarialReport",
    "SanityCase",
    "SanityReport",
    "evaluate_adversarial",
    "evaluate_critic",
    "load_adversarial_cases",
    "load_sanity_cases",
]

WORSE_KINDS = ("passive", "off_topic", "repetitive")
GAMING_KINDS = (
    "keyword_list",
    "recite_unrevealed",
    "ramble",
    "meta",
    "truncated",
    "placeholder",
    "echo",
    "passive",
)


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


def _read_data(name: str, path: Path | None) -> str:
    if path is None:
        return resources.files("learner").joinpath("data", name).read_text("utf-8")
    return Path(path).read_text(encoding="utf-8")


def load_sanity_cases(path: Path | None = None) -> list[SanityCase]:
    text = _read_data("critic_sanity.jsonl", path)
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


@dataclass(frozen=True)
class AdversarialCase(SanityCase):
    """A sanity case whose replies are one good reply and one per gaming kind."""

    split: str = "dev"  # "dev" or "heldout"


@dataclass
class AdversarialReport:
    critic_model_id: str
    split: str
    cases: int
    pairs: int
    preference: float  # share of (good, gaming) pairs where the good reply wins
    preference_by_kind: dict[str, float] = field(default_factory=dict)
    good_pass_rate: float = 0.0  # good replies scored >= 4 on all three dimensions
    gaming_pass_rate: float = 0.0
    unscored_replies: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_adversarial_cases(
    path: Path | None = None, split: str | None = None
) -> list[AdversarialCase]:
    """The adversarial contexts; ``split`` keeps only "dev" or "heldout" ones."""
    cases = []
    for line_no, line in enumerate(_read_data("critic_adversarial.jsonl", path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            case = AdversarialCase(
                id=raw["id"],
                split=raw["split"],
                name=raw["persona"]["name"],
                background=raw["persona"]["background"],
                history=tuple((r, c) for r, c in raw["history"]),
                replies={k: raw["replies"][k] for k in ("good", *GAMING_KINDS)},
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"adversarial set line {line_no} is malformed: {exc}") from exc
        if split is None or case.split == split:
            cases.append(case)
    return cases


def _mean_value(score: Score) -> float | None:
    values = [score.value(d) for d in DIMENSIONS]
    return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def evaluate_adversarial(
    critic: Critic,
    cases: list[AdversarialCase] | None = None,
    *,
    split: str = "all",
    threshold: int = 4,
) -> AdversarialReport:
    """Pairwise preference of the good reply over each gaming reply (mean of the three)."""
    if cases is None:
        cases = load_adversarial_cases(split=None if split == "all" else split)
    kinds = ("good", *GAMING_KINDS)
    items = [case.item(kind) for case in cases for kind in kinds]
    scores = critic.score_batch(items)
    wins = dict.fromkeys(GAMING_KINDS, 0.0)
    good_pass = gaming_pass = 0
    for c in range(len(cases)):
        by_kind = dict(zip(kinds, scores[c * len(kinds) : (c + 1) * len(kinds)], strict=True))
        good = _mean_value(by_kind["good"])
        good_pass += int(by_kind["good"].scored and not by_kind["good"].failing(threshold))
        for kind in GAMING_KINDS:
            worse = _mean_value(by_kind[kind])
            gaming_pass += int(by_kind[kind].scored and not by_kind[kind].failing(threshold))
            if good is None or worse is None or good == worse:
                wins[kind] += 0.5
            elif good > worse:
                wins[kind] += 1.0
    n = max(len(cases), 1)
    return AdversarialReport(
        critic_model_id=critic.model_id,
        split=split,
        cases=len(cases),
        pairs=len(cases) * len(GAMING_KINDS),
        preference=sum(wins.values()) / (n * len(GAMING_KINDS)),
        preference_by_kind={k: wins[k] / n for k in GAMING_KINDS},
        good_pass_rate=good_pass / n,
        gaming_pass_rate=gaming_pass / (n * len(GAMING_KINDS)),
        unscored_replies=sum(1 for s in scores if not s.scored),
    )
