"""`upc learn train --pairs` and `upc learn gate`: another recipe retrained on the pairs a run
recorded (no corpus generated again), then gated on its own, through the real CLI, with a tiny
random model."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import load_settings
from learner import stages
from learner.registry import AdapterRegistry
from storage.db import Database

REPO = Path(__file__).resolve().parents[1]

PAIRS = [
    {
        "pair_id": f"d{k}-t1",
        "dialogue_id": f"d{k}",
        "prompt": [{"role": "user", "content": f"I repair bicycles, {k} a day in summer."}],
        "chosen": "Summer must keep you busy. Which repair comes up most often?",
        "rejected": "How can I help you today?",
        "rejected_capped": False,
    }
    for k in range(4)
]


def _env(tmp_path: Path, tiny_model_dir: Path, **extra: str) -> dict[str, str]:
    model = str(tiny_model_dir)
    values = {
        "UPC_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(REPO),
        "UPC_CHATBOT__MODEL": model,
        "UPC_USER_SIM__MODEL": model,
        "UPC_CRITIC__MODEL": model,
        "UPC_CHATBOT__DEVICE": "cpu",
        "UPC_USER_SIM__DEVICE": "cpu",
        "UPC_CRITIC__DEVICE": "cpu",
        "UPC_GENERATION__MAX_NEW_TOKENS": "8",
        "UPC_LEARNER__TURNS": "2",
        "UPC_LEARNER__GATE_CRITIC": "llm",
        "UPC_LEARNER__GATE_USERS": "2",
        "UPC_LEARNER__GATE_SEEDS": "1",
        "UPC_LEARNER__LORA_RANK": "8",
        "UPC_LEARNER__EPOCHS": "0",
        "UPC_LEARNER__DPO": "true",
        "UPC_LEARNER__DPO_LEARNING_RATE": "5e-3",
        "UPC_LEARNER__TRAIN_BATCH_SIZE": "2",
        **extra,
    }
    return {**os.environ, **values}


def _upc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "learner", "learn", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _registry(tmp_path: Path) -> AdapterRegistry:
    settings = load_settings(env={}, data_dir=tmp_path / "data")
    return AdapterRegistry(settings.adapters_dir, Database.from_settings(settings))


def _json_head(stdout: str) -> dict:
    """The JSON object a command printed first."""
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{") :])[0]


@pytest.fixture()
def pairs_gz(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(p) + "\n" for p in PAIRS).encode()))
    return path


def test_recorded_pairs_retrain_and_the_gate_runs_alone(tmp_path, tiny_model_dir, pairs_gz):
    env = _env(tmp_path, tiny_model_dir)
    run = _upc(env, "train", "--iteration", "1", "--pairs", str(pairs_gz), "--no-progress")
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    summary = _json_head(run.stdout)
    adapter_id = summary["adapter_id"]
    assert adapter_id.startswith("it001-") and not summary["reused"]
    assert summary["metrics"]["dpo"]["steps"] > 0 and summary["metrics"]["steps"] == 0
    registry = _registry(tmp_path)
    manifest = registry.verify(adapter_id)
    assert manifest.training_dialogue_ids == ["d0", "d1", "d2", "d3"]
    assert manifest.parent_id is None and registry.active_id() == "base"
    copied = tmp_path / "data" / "runs" / "iter-001" / "recorded" / "pairs.jsonl"
    assert [json.loads(x)["pair_id"] for x in copied.read_text().splitlines()] == [
        p["pair_id"] for p in PAIRS
    ]
    # The same pairs and recipe give the same adapter, found and reused.
    again = _upc(env, "train", "--iteration", "1", "--pairs", str(pairs_gz), "--no-progress")
    assert again.returncode == 0 and _json_head(again.stdout) == {**summary, "reused": True}

    # A gate that cannot pass (margin 5 on a 1..5 scale) records its refusal and promotes nothing.
    strict = _env(tmp_path, tiny_model_dir, UPC_LEARNER__GATE_MARGIN="5")
    refused = _upc(strict, "gate", "--adapter", adapter_id, "--promote")
    assert refused.returncode == 1, refused.stdout[-1500:] + refused.stderr[-1500:]
    decision = _json_head(refused.stdout)
    assert decision["promote"] is False and decision["promoted"] is False
    assert decision["n_users"] == 2 and decision["baseline_id"] == "base"
    assert "refused" in refused.stdout and registry.active_id() == "base"
    assert registry.get(adapter_id).gate["promote"] is False

    lenient = _env(
        tmp_path, tiny_model_dir, UPC_LEARNER__GATE_MARGIN="-5", UPC_LEARNER__GATE_TOLERANCE="1000"
    )
    passed = _upc(lenient, "gate", "--adapter", adapter_id, "--promote")
    assert passed.returncode == 0, passed.stdout[-1500:] + passed.stderr[-1500:]
    assert _json_head(passed.stdout)["promoted"] is True and "PROMOTED" in passed.stdout
    assert registry.active_id() == adapter_id
    # The active adapter cannot be gated against itself; an unknown one is named.
    for candidate, message in ((adapter_id, "already the active adapter"), ("it009-nope", "")):
        bad = _upc(lenient, "gate", "--adapter", candidate)
        assert bad.returncode == 2 and bad.stdout.startswith("error: "), bad.stdout + bad.stderr
        assert message in bad.stdout and "Traceback" not in bad.stdout + bad.stderr


def test_bad_recorded_pairs_are_refused_by_name(tmp_path, tiny_model_dir, pairs_gz):
    env = _env(tmp_path, tiny_model_dir)
    binary = tmp_path / "junk.jsonl.gz"
    binary.write_bytes(b"\x1f\x8b\x08\x00garbage\xff\xfe")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"prompt": [], "chosen": "x"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cases = [
        (binary, "not UTF-8 JSON lines"),
        (broken, f"{broken}:2: not JSON"),
        (partial, f"{partial}:1: a pair needs prompt, chosen and rejected"),
        (empty, "no preference pairs"),
        (tmp_path / "missing.jsonl", "missing.jsonl"),
    ]
    runs = tmp_path / "data" / "runs"
    for path, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
            stages.recorded_pairs(runs, 1, path)
    # The command says the same, with no traceback.
    run = _upc(env, "train", "--iteration", "1", "--pairs", str(binary), "--no-progress")
    assert run.returncode == 2 and run.stdout.startswith("error: ") and "not UTF-8" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    # Recorded pairs train DPO alone; an SFT recipe is refused, not run on nothing.
    sft = _env(tmp_path, tiny_model_dir, UPC_LEARNER__EPOCHS="2")
    run = _upc(sft, "train", "--iteration", "1", "--pairs", str(pairs_gz), "--no-progress")
    assert run.returncode == 2 and "DPO alone" in run.stdout, run.stdout + run.stderr
    assert not _registry(tmp_path).list()
