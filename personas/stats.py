"""Counts and length figures for a list of personas (the `upc personas stats` numbers)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from personas.records import SPLITS, Persona

__all__ = ["PersonaStats", "persona_stats"]


@dataclass(frozen=True)
class PersonaStats:
    count: int
    per_split: dict[str, int]
    per_group: dict[str, tuple[str, str, int]]  # code -> (title, split, count)
    per_set: dict[str, int]
    setback_share: float | None  # None when no persona has structured traits
    words_min: int
    words_mean: float
    words_max: int
    histogram: list[tuple[int, int, int]]  # (low, high inclusive, count)


def persona_stats(personas: Sequence[Persona], bin_width: int = 10) -> PersonaStats:
    lengths = [p.word_count for p in personas]
    bins: Counter[int] = Counter(length // bin_width for length in lengths)
    histogram = [
        (b * bin_width, b * bin_width + bin_width - 1, bins[b])
        for b in range(min(bins, default=0), max(bins, default=-1) + 1)
    ]
    groups: dict[str, tuple[str, str, int]] = {}
    for p in personas:
        if p.isco_code:
            title, split, count = groups.get(p.isco_code, (p.isco_title, p.split, 0))
            groups[p.isco_code] = (title, split, count + 1)
    with_traits = [p for p in personas if not p.traits.is_empty]
    return PersonaStats(
        count=len(personas),
        per_split={s: sum(1 for p in personas if p.split == s) for s in SPLITS},
        per_group=dict(sorted(groups.items())),
        per_set=dict(sorted(Counter(p.source for p in personas).items())),
        setback_share=(
            sum(p.has_setback for p in with_traits) / len(with_traits) if with_traits else None
        ),
        words_min=min(lengths, default=0),
        words_mean=sum(lengths) / len(lengths) if lengths else 0.0,
        words_max=max(lengths, default=0),
        histogram=histogram,
    )
