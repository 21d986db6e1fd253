"""Precision and recall of the poisoning guard on its labelled samples (prints JSON).

`guard_sample.jsonl` is the sample the rules were written against (its obfuscated cases
and benign look-alikes were written before the normalising rules); `guard_holdout.jsonl`
was written after the rules and never used to change them.

    python bench/guard_quality.py
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from learner.guard import evaluate_sample, load_sample

SAMPLES = ("guard_sample.jsonl", "guard_holdout.jsonl")


def main() -> None:
    out = {}
    for name in SAMPLES:
        path = Path(str(resources.files("learner").joinpath(f"data/{name}")))
        m = evaluate_sample(load_sample(path))
        out[name] = {
            "n": m.n,
            "positives": m.positives,
            "negatives": m.negatives,
            "precision": m.precision,
            "recall": m.recall,
            "false_positive_rate": m.false_positive_rate,
            "by_label": m.by_label,
            "misses": m.misses,
            "false_alarms": m.false_alarms,
        }
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
