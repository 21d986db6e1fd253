"""kill -9 chaos (prints JSON): see `tests/security/chaos.py`.

The app, the learning worker and `upc erase` share one data dir (tiny random model, real
tokenizer, real SQLite, real HTTP on 127.0.0.1). Each cycle SIGKILLs one of them at a
random point of chat (mid-stream), generation, training, promotion or erasure, restarts
it and checks: no acknowledged turn lost, no reply left `streaming`, every published
adapter whole and `ACTIVE` naming one, `PRAGMA integrity_check` ok. Issue 16's target:
200 cycles, 0 of each.

    PYTHONPATH=. python bench/chaos/kill9.py --runs 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench._record import machine
from core.runtime import ensure_embedded_model
from tests.conftest import make_tiny_model
from tests.security.chaos import TARGETS, Chaos, summarise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200, help="kill cycles")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and its logs")
    parser.add_argument(
        "--max-minutes", type=float, default=0, help="stop after this long (0: no limit)"
    )
    args = parser.parse_args()
    # A plain `kill` of the bench must still stop the app and worker it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="upc-kill9-"))
    models = Path(os.environ.get("UPC_TEST_MODELS_DIR") or root / "models")
    tiny = make_tiny_model(root / "tiny", ensure_embedded_model(models))
    chaos = Chaos(root / "sys", tiny, seed=args.seed)
    started = time.monotonic()
    results = []
    chaos.start_app()
    try:
        for n in range(args.runs):
            if args.max_minutes and time.monotonic() - started > 60 * args.max_minutes:
                break
            target = TARGETS[n % len(TARGETS)] if n < len(TARGETS) else chaos.rng.choice(TARGETS)
            result = chaos.cycle(n, target)
            results.append(result)
            print(
                json.dumps(
                    {
                        "cycle": n,
                        "target": target,
                        "ok": result.ok,
                        "at": result.killed_at,
                        "s": result.seconds,
                    }
                ),
                file=sys.stderr,
                flush=True,
            )
    finally:
        chaos.stop_all()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = summarise(results, chaos.ledger)
    summary["duration_s"] = round(time.monotonic() - started, 1)
    summary["seed"] = args.seed
    summary["runs_asked"] = args.runs
    summary["machine"] = machine()
    if args.keep:
        summary["dir"] = str(root)
    print(json.dumps(summary, indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
