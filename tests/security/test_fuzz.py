"""Input fuzzing through the real surface (the quick part; `bench/chaos/fuzz.py` runs
thousands): chat sends and preferences through Gradio's HTTP API, `/v1`, persona and
adapter imports and settings through the CLI. No 5xx, no internals in any answer, nothing
half-stored; every refusal of a request that reaches our code says why."""

from __future__ import annotations

import random

import httpx
import pytest

from tests.security.conftest import cli, client, stop_and_clean, tiny_app
from tests.security.fuzz import FuzzPlan, fuzz_app_env, run_suite, silent_refusals

pytestmark = pytest.mark.slow

PLAN = FuzzPlan(send=150, v1=150, persona_files=5, adapter_dirs=5, settings=5)


def test_fuzz_chat_v1_imports_and_settings(tmp_path, tiny_model_dir):
    app = tiny_app(tmp_path, tiny_model_dir, **fuzz_app_env())
    app.start()
    files = tmp_path / "files"
    files.mkdir()
    try:
        bid, *_ = client(app).predict("", api_name="/load")
        tally = run_suite(app, random.Random(16), PLAN, files, cli, bid)
        healthy = httpx.get(f"{app.base_url}/healthz", timeout=10).status_code == 200
    finally:
        stop_and_clean(app, tmp_path)
    counts = tally.counts()
    assert tally.failures() == [], tally.failures()[:5]
    assert healthy
    assert counts["send"].get("accepted", 0) > 10 and counts["v1"].get("accepted", 0) > 10
    assert silent_refusals(tally) == []
    for target in ("persona-import", "adapter-import"):
        assert counts[target].get("accepted", 0) == 0, tally.outcomes
