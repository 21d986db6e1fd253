"""Per-user statistics for comparing systems: per-user means and the paired user bootstrap.

Replies of one dialogue are not independent (same user, same history), and the two systems
of a comparison talk to the same users, so the unit of resampling is the *user*: each user
contributes one number per system (the mean over its dialogues, one per seed, of the mean
over that dialogue's scored replies), and the bootstrap resamples users with replacement and
recomputes the mean per-user difference. Users present on one side only are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from learner.records import DIMENSIONS, DialogueRecord, Score

__all__ = [
    "PairedCI",
    "dialogue_mean",
    "paired_bootstrap",
    "per_user_means",
    "per_user_values",
    "score_value",
]


def score_value(score: Score, dims: Sequence[str] = DIMENSIONS) -> float | None:
    """The mean of ``dims`` for one reply; None when the reply is unscored."""
    if not score.scored:
        return None
    values = [score.value(d) for d in dims]
    return float(np.mean(values))  # type: ignore[arg-type]


def dialogue_mean(scores: Sequence[Score], dims: Sequence[str] = DIMENSIONS) -> float | None:
    """The mean over a dialogue's scored replies of ``score_value``; None when none is scored."""
    values = [v for v in (score_value(s, dims) for s in scores) if v is not None]
    return float(np.mean(values)) if values else None


def per_user_values(pairs: Iterable[tuple[str, float | None]]) -> dict[str, float]:
    """Mean value per key (persona id) over its items; None values are skipped."""
    groups: dict[str, list[float]] = {}
    for key, value in pairs:
        if value is not None:
            groups.setdefault(key, []).append(float(value))
    return {key: float(np.mean(values)) for key, values in groups.items()}


def per_user_means(
    dialogues: Sequence[DialogueRecord],
    dims: Sequence[str] = DIMENSIONS,
    *,
    scores: Sequence[Sequence[Score]] | None = None,
) -> dict[str, float]:
    """Persona id -> mean over its dialogues (seeds) of the dialogue's mean score on ``dims``.

    ``scores`` (one list per dialogue, aligned with ``dialogues`` and their turns) replaces
    the scores stored in the turns, e.g. a second critic's re-scoring.
    """
    if scores is not None and len(scores) != len(dialogues):
        raise ValueError("scores must hold one list per dialogue")
    pairs = []
    for i, record in enumerate(dialogues):
        own = scores[i] if scores is not None else [t.final_score for t in record.turns]
        pairs.append((record.persona_id, dialogue_mean(own, dims)))
    return per_user_values(pairs)


@dataclass(frozen=True)
class PairedCI:
    """Candidate minus base over the users both have, with a user-bootstrap interval."""

    mean_diff: float | None
    lo: float | None
    hi: float | None
    relative_gain: float | None  # mean_diff / base mean (None when the base mean is 0)
    n_users: int
    base_mean: float | None = None
    candidate_mean: float | None = None
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        if self.lo is None or self.hi is None:
            return False
        return self.lo > 0.0 or self.hi < 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def paired_bootstrap(
    candidate: Mapping[str, float],
    base: Mapping[str, float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedCI:
    """Percentile interval of the mean per-user difference, resampling users (paired).

    Only users present in both mappings count. One user gives a zero-width interval; no
    common user gives all None.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be between 0 and 1")
    users = sorted(set(candidate) & set(base))
    if not users:
        return PairedCI(None, None, None, None, 0, confidence=confidence)
    cand = np.asarray([candidate[u] for u in users], dtype=np.float64)
    ref = np.asarray([base[u] for u in users], dtype=np.float64)
    diffs = cand - ref
    mean_diff = float(diffs.mean())
    base_mean = float(ref.mean())
    relative = mean_diff / base_mean if base_mean != 0.0 else None
    if len(users) == 1 or n_boot < 1:
        lo = hi = mean_diff
    else:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(users), size=(n_boot, len(users)))
        means = diffs[picks].mean(axis=1)
        tail = (1.0 - confidence) / 2.0
        low, high = np.quantile(means, [tail, 1.0 - tail])
        lo, hi = float(low), float(high)
    return PairedCI(
        mean_diff=mean_diff,
        lo=lo,
        hi=hi,
        relative_gain=relative,
        n_users=len(users),
        base_mean=base_mean,
        candidate_mean=float(cand.mean()),
        confidence=confidence,
    )
