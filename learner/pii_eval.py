"""Precision and recall of the export scrubber per kind, on a labelled sample.

A sample line is ``{"text": ..., "spans": [{"kind": "card", "value": "4111 ..."}]}``; a
text with no spans is a hard negative. A labelled value counts as found when it is gone
from the scrubbed text and a placeholder of its kind is there; every further placeholder
of a kind is a false alarm (a card scrubbed as a phone is a miss for cards and a false
alarm for phones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from learner.pii import PII_KINDS, PiiScrubber, ScrubCounts
from learner.samples import sample_rows

__all__ = ["KindMetrics", "LabelledPii", "evaluate_pii", "load_pii_sample"]


@dataclass(frozen=True)
class LabelledPii:
    text: str
    spans: tuple[tuple[str, str], ...]  # (kind, value)
    note: str = ""


@dataclass
class KindMetrics:
    labelled: int = 0
    found: int = 0
    false_alarms: int = 0
    misses: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float:
        flagged = self.found + self.false_alarms
        return round(self.found / flagged, 4) if flagged else 1.0

    @property
    def recall(self) -> float:
        return round(self.found / self.labelled, 4) if self.labelled else 1.0


def load_pii_sample(path: Path | None = None) -> list[LabelledPii]:
    out = []
    for n, row in sample_rows("pii_sample.jsonl", path):
        spans = tuple((s["kind"], s["value"]) for s in row.get("spans", []))
        for kind, value in spans:
            if kind not in PII_KINDS or value not in row["text"]:
                raise ValueError(f"PII sample line {n}: bad span {kind!r} {value!r}")
        out.append(LabelledPii(row["text"], spans, row.get("note", "")))
    return out


def evaluate_pii(sample: Sequence[LabelledPii]) -> dict[str, KindMetrics]:
    scrubber = PiiScrubber()
    metrics = {kind: KindMetrics() for kind in PII_KINDS}
    for item in sample:
        out = scrubber.scrub(item.text, ScrubCounts())
        explained = dict.fromkeys(PII_KINDS, 0)
        for kind, value in item.spans:
            m = metrics[kind]
            m.labelled += 1
            if value not in out and f"[{kind.upper()}]" in out:
                m.found += 1
                explained[kind] += 1
            else:
                m.misses.append(f"{item.text} -> {out}")
        for kind in PII_KINDS:
            extra = out.count(f"[{kind.upper()}]") - explained[kind]
            if extra > 0:
                metrics[kind].false_alarms += extra
                metrics[kind].alarms.append(f"{item.text} -> {out}")
    return metrics
