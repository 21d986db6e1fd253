"""Input fuzzing of the running app at scale (prints JSON): see `tests/security/fuzz.py`.

Starts the app on a tiny random model (real tokenizer, real SQLite, real HTTP) in a temp
dir and sends generated hostile input to the chat, `/v1`, persona and adapter imports and
settings. Target of issue 16: 5,000 cases, 0 server errors, a clear error each, nothing
half-stored.

    PYTHONPATH=. python bench/chaos/fuzz.py --cases 5000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from core.runtime import ensure_embedded_model
from tests.conftest import make_tiny_model
from tests.security.conftest import cli, client, tiny_app
from tests.security.fuzz import FuzzPlan, fuzz_app_env, run_suite, silent_refusals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    # CLI cases start a process each (seconds): 1 % of the cases per CLI target.
    cli_cases = max(3, args.cases // 100)
    http_cases = args.cases - 3 * cli_cases - 7
    plan = FuzzPlan(
        send=http_cases * 2 // 5,
        v1=http_cases - http_cases * 2 // 5,
        persona_files=cli_cases,
        adapter_dirs=cli_cases,
        settings=cli_cases,
    )
    with tempfile.TemporaryDirectory(prefix="upc-fuzz-") as tmp:
        root = Path(tmp)
        models = Path(os.environ.get("UPC_TEST_MODELS_DIR") or root / "models")
        tiny = make_tiny_model(root / "tiny", ensure_embedded_model(models))
        app = tiny_app(root / "app", tiny, **fuzz_app_env())
        app.start()
        files = root / "files"
        files.mkdir()
        started = time.monotonic()
        try:
            bid, *_ = client(app).predict("", api_name="/load")
            tally = run_suite(app, random.Random(args.seed), plan, files, cli, bid)
        finally:
            app.stop()
        elapsed = time.monotonic() - started
    failures = tally.failures()
    silent = silent_refusals(tally)
    print(
        json.dumps(
            {
                "cases": len(tally.outcomes),
                "seed": args.seed,
                "duration_s": round(elapsed, 1),
                "by_target": tally.counts(),
                "server_errors": sum(o.verdict == "server-error" for o in tally.outcomes),
                "leaks": sum(o.verdict == "leak" for o in tally.outcomes),
                "half_stored": sum(o.verdict == "half-stored" for o in tally.outcomes),
                "silent_refusals_of_ours": len(silent),
                "failures": [o.__dict__ for o in failures[:20]],
                "silent_examples": [o.__dict__ for o in silent[:10]],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
