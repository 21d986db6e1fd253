"""Diversity of backgrounds, measured with the shipped MiniLM sentence embedding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from personas.records import Persona

__all__ = [
    "DUPLICATE_THRESHOLD",
    "DiversityReport",
    "GroupDiversity",
    "TextEncoder",
    "diversity_report",
    "max_similarity",
    "pairwise_summary",
]

DUPLICATE_THRESHOLD = 0.9


class TextEncoder(Protocol):
    """What we need from `core.embeddings.Embedder`: unit-norm vectors."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class GroupDiversity:
    n: int
    mean: float
    max: float


@dataclass
class DiversityReport:
    n: int
    mean: float
    max: float
    max_pair: tuple[str, str] | None
    pairs_above: int
    threshold: float
    within: dict[str, GroupDiversity] = field(default_factory=dict)

    @property
    def within_mean(self) -> float:
        """Mean over groups of the within-group mean cosine."""
        values = [g.mean for g in self.within.values() if g.n > 1]
        return float(np.mean(values)) if values else float("nan")

    @property
    def within_max(self) -> float:
        values = [g.max for g in self.within.values() if g.n > 1]
        return float(max(values)) if values else float("nan")

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "mean_cosine": round(self.mean, 4),
            "max_cosine": round(self.max, 4),
            "max_pair": list(self.max_pair) if self.max_pair else None,
            "pairs_above_threshold": self.pairs_above,
            "threshold": self.threshold,
            "within_group_mean_cosine": round(self.within_mean, 4),
            "within_group_max_cosine": round(self.within_max, 4),
            "groups": {
                code: {"n": g.n, "mean_cosine": round(g.mean, 4), "max_cosine": round(g.max, 4)}
                for code, g in sorted(self.within.items())
            },
        }


def pairwise_summary(vectors: np.ndarray) -> tuple[float, float, tuple[int, int] | None]:
    """Mean and max cosine over distinct pairs of unit vectors, and the argmax pair."""
    n = len(vectors)
    if n < 2:
        return float("nan"), float("nan"), None
    sims = vectors @ vectors.T
    upper = np.triu_indices(n, k=1)
    values = sims[upper]
    best = int(np.argmax(values))
    return float(values.mean()), float(values[best]), (int(upper[0][best]), int(upper[1][best]))


def max_similarity(candidates: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """For each candidate vector, its highest cosine to any pool vector (0 for an empty pool)."""
    if len(pool) == 0 or len(candidates) == 0:
        return np.zeros(len(candidates), dtype=np.float32)
    return (candidates @ pool.T).max(axis=1)


def diversity_report(
    personas: Sequence[Persona],
    encoder: TextEncoder,
    threshold: float = DUPLICATE_THRESHOLD,
    vectors: np.ndarray | None = None,
) -> DiversityReport:
    """Pairwise cosine figures overall and within each occupation group."""
    if vectors is None:
        vectors = encoder.encode([p.background for p in personas])
    mean, top, pair = pairwise_summary(vectors)
    n = len(personas)
    above = 0
    if n > 1:
        sims = vectors @ vectors.T
        above = int((sims[np.triu_indices(n, k=1)] > threshold).sum())
    groups: dict[str, list[int]] = {}
    for index, persona in enumerate(personas):
        if persona.isco_code:
            groups.setdefault(persona.isco_code, []).append(index)
    within = {}
    for code, indices in groups.items():
        g_mean, g_max, _ = pairwise_summary(vectors[indices])
        within[code] = GroupDiversity(n=len(indices), mean=g_mean, max=g_max)
    return DiversityReport(
        n=n,
        mean=mean,
        max=top,
        max_pair=(personas[pair[0]].id, personas[pair[1]].id) if pair else None,
        pairs_above=above,
        threshold=threshold,
        within=within,
    )
