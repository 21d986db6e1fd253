"""Precision and recall of the export PII scrubber per kind (prints JSON).

`pii_sample.jsonl` was written before the card, IBAN, date and name rules;
`pii_holdout.jsonl` after them, and never used to change a rule.

    python bench/pii_quality.py
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from learner.pii_eval import evaluate_pii, load_pii_sample

SAMPLES = ("pii_sample.jsonl", "pii_holdout.jsonl")


def main() -> None:
    out = {}
    for name in SAMPLES:
        path = Path(str(resources.files("learner").joinpath(f"data/{name}")))
        if not path.exists():
            continue
        sample = load_pii_sample(path)
        per_kind = evaluate_pii(sample)
        out[name] = {
            "texts": len(sample),
            "hard_negatives": sum(1 for s in sample if not s.spans),
            "kinds": {
                kind: {
                    "labelled": m.labelled,
                    "found": m.found,
                    "false_alarms": m.false_alarms,
                    "precision": m.precision,
                    "recall": m.recall,
                    "misses": m.misses,
                    "false_alarm_texts": m.alarms,
                }
                for kind, m in per_kind.items()
                if m.labelled or m.false_alarms
            },
        }
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
