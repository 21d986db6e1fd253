"""Troll cohorts in the logged dialogues (prints JSON): see `tests/security/poison.py`.

For each share of trolls (default 10 %, 30 %, 51 % of `--users`), a fresh data dir of real
conversations goes through the real worker: critique, poisoning guard, retrain and a gate
forced open. Issue 16's target: no adapter trained on the trolls is promoted; the guard's
precision and recall per user and per turn are reported.

    PYTHONPATH=. python bench/chaos/poison.py --users 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench._record import machine
from core.runtime import ensure_embedded_model
from tests.conftest import make_tiny_model
from tests.security.poison import run_cohort


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--shares", default="0.1,0.3,0.51")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="upc-poison-") as tmp:
        root = Path(tmp)
        models = Path(os.environ.get("UPC_TEST_MODELS_DIR") or root / "models")
        tiny = make_tiny_model(root / "tiny", ensure_embedded_model(models))
        results = [
            run_cohort(root, tiny, float(share), args.users, seed=args.seed)
            for share in args.shares.split(",")
        ]
    print(json.dumps({"cohorts": [asdict(r) for r in results], "machine": machine()}, indent=2))
    clean = all(not r.poisoned_in_promoted and not r.troll_turns_in_promoted for r in results)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
