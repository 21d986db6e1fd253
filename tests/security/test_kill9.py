"""Issue 16's kill -9 suite, quick: one SIGKILL each at chat (mid-stream), generation,
training, promotion and erasure, on one data dir (`bench/chaos/kill9.py` runs 200)."""

from __future__ import annotations

import pytest

from tests.security.chaos import TARGETS, Chaos, summarise

pytestmark = pytest.mark.slow


def test_kill_9_anywhere_loses_no_acknowledged_turn_and_serves_no_half_adapter(
    tmp_path, tiny_model_dir
):
    chaos = Chaos(tmp_path / "sys", tiny_model_dir, seed=7)
    chaos.start_app()
    try:
        results = [chaos.cycle(n, target) for n, target in enumerate(TARGETS)]
    finally:
        chaos.stop_all()
    summary = summarise(results, chaos.ledger)
    assert summary["failed_cycles"] == [], summary
    assert [r.target for r in results] == list(TARGETS)
    killed = {r.target: r.killed_at for r in results}
    # Each kill landed where it was aimed.
    assert killed["generation"] == "generate" and killed["training"] == "train"
    assert killed["promotion"] in ("promote", "hotload"), killed
    assert killed["erasure"] != "no user to erase"
    # Acknowledged turns were checked, not vacuous (on a loaded box the chat cycle's kill
    # may land in the greetings; the erasure cycle then chats once before it erases).
    assert chaos.ledger.acked and chaos.ledger.erased
    assert summary["refused_sends"] == 0, summary["refused_examples"]
    assert summary["lost_acknowledged_turns"] == 0 and summary["integrity_failures"] == 0
