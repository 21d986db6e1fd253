"""Cross-user probes with canaries, and the console matrix (prints JSON): see
`tests/security/probes.py`. Issue 16's targets: 10,000 requests, 0 leaks; every console
handler refused as anonymous, as a user, and from a foreign origin or host.

    PYTHONPATH=. python bench/chaos/probes.py --requests 10000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._record import machine
from core.runtime import ensure_embedded_model
from tests.conftest import make_tiny_model
from tests.security.conftest import cli, tiny_app
from tests.security.probes import (
    ADMIN,
    USERS,
    Actor,
    console_matrix,
    export_link,
    probe,
    probe_app_env,
    seed_users,
    summarise_matrix,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="upc-probes-") as tmp:
        root = Path(tmp)
        models = Path(os.environ.get("UPC_TEST_MODELS_DIR") or root / "models")
        tiny = make_tiny_model(root / "tiny", ensure_embedded_model(models))
        app = tiny_app(root / "app", tiny, **probe_app_env())
        for name, password in [ADMIN, *USERS]:
            extra = ["--admin"] if (name, password) == ADMIN else []
            made = cli(app, "users", "add", name, "--password", password, *extra)
            assert made.returncode == 0, made.stderr
        app.start()
        try:
            started = time.monotonic()
            admin, *users = seed_users(app, [ADMIN, *USERS], rng)
            nobody = Actor("nobody", httpx.Client(base_url=app.base_url, timeout=60))
            links = [export_link(admin)]
            matrix = console_matrix(app, admin, users[0], nobody, users[1].conversations[0])
            report = probe(app, [admin, *users], nobody, args.requests, rng, links)
            # The link survived every attacker and holds everyone's canaries: a leak through
            # it would have been seen.
            got = admin.client.get(links[0])
            canaries_in_export = sum(c in got.text for a in users for c in a.canaries)
            elapsed = time.monotonic() - started
        finally:
            app.stop()
    summary = summarise_matrix(matrix)
    print(
        json.dumps(
            {
                "requests": report.requests,
                "leaks": len(report.leaks),
                "leak_examples": report.leaks[:10],
                "server_errors": len(report.server_errors),
                "server_error_examples": report.server_errors[:10],
                "by_kind": dict(report.by_kind),
                "by_status": {str(k): v for k, v in sorted(report.by_status.items())},
                "export_link_after_attacks": got.status_code,
                "canaries_in_export": canaries_in_export,
                "console": summary,
                "duration_s": round(elapsed, 1),
                "seed": args.seed,
                "machine": machine(),
            },
            indent=2,
        )
    )
    ok = not report.leaks and not report.server_errors and not summary["not_refused"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
