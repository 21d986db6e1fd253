"""Data-parallel generation: two gloo ranks under torchrun make the same corpus as one
process with the same seed (the property that lets users be split across GPUs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from core.settings import load_settings
from learner.distributed import Rank, current_rank, shard_positions
from learner.store import CorpusStore
from storage.db import Database

REPO = Path(__file__).resolve().parent.parent


def test_ranks_share_out_every_position_once(monkeypatch):
    items = list("abcdefg")
    shares = [shard_positions(items, Rank(index=k, world=3)) for k in range(3)]
    assert sorted(p for share in shares for p in share) == list(range(7))
    assert shares[1] == [1, 4]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current_rank() == Rank(1, 2, 1) and not current_rank().main
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert current_rank() == Rank() and not Rank().distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(data_dir: Path, model: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        UPC_DATA_DIR=str(data_dir),
        UPC_CHATBOT__MODEL=str(model),
        UPC_USER_SIM__MODEL=str(model),
        UPC_CRITIC__MODEL=str(model),
        UPC_CHATBOT__DEVICE="cpu",
        UPC_USER_SIM__DEVICE="cpu",
        UPC_CRITIC__DEVICE="cpu",
        UPC_LEARNER__CRITIC="llm",
        UPC_LEARNER__MAX_REGENERATIONS="1",
        UPC_LEARNER__BEST_OF_N="2",
        UPC_GENERATION__MAX_NEW_TOKENS="8",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
    )
    return env


def _corpus(data_dir: Path) -> dict[str, tuple]:
    settings = load_settings(env={}, data_dir=data_dir)
    db = Database.from_settings(settings)
    store = CorpusStore(db)
    run = store.get_run(1)
    assert run is not None
    out = {
        d.persona_id: (
            d.status,
            d.greeting,
            d.user_intro,
            [(t.final_reply, t.user_answer, [a.reply for a in t.attempts]) for t in d.turns],
        )
        for d in store.dialogues(run.id)
    }
    db.dispose()
    return out


def test_two_ranks_make_the_same_corpus_as_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["learn", "generate", "--users", "4", "--turns", "2", "--no-progress", "--seed", "3"]
    one = tmp_path / "one"
    single = subprocess.run(
        [sys.executable, "-m", "chatbot.cli", *args],
        env=_env(one, tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    two = tmp_path / "two"
    # The data dir exists before the ranks start (they share it, as replicas do).
    Database.from_settings(load_settings(env={}, data_dir=two)).dispose()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    split = subprocess.run(
        [*launcher, "-m", "chatbot.cli", *args],
        env=_env(two, tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert split.returncode == 0, split.stderr[-2000:]
    assert "iteration 1: 4 done" in split.stdout  # printed once, by the first rank
    assert split.stdout.count(" dialogues; ") == 1
    corpus_one, corpus_two = _corpus(one), _corpus(two)
    assert len(corpus_one) == 4
    assert corpus_two == corpus_one


def _adapter_tensors(data_dir: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    files = sorted((data_dir / "adapters").glob("*/adapter_model.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


def test_two_ranks_train_the_same_adapter_as_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`upc learn train` under torchrun: each rank takes half of every batch and the
    gradients are summed, so two gloo ranks train the adapter one process trains."""
    import shutil

    import torch

    one, two = tmp_path / "one", tmp_path / "two"
    env = _env(one, tiny_model_dir)
    env.update(
        UPC_LEARNER__ALPHA="1",  # every finished dialogue is easy: there is data
        UPC_LEARNER__BETA="0",
        UPC_LEARNER__SKIP_FLAGGED_TARGETS="false",  # a random model's replies are all flagged
        UPC_LEARNER__HOLDOUT_RATIO="0",
        UPC_LEARNER__LORA_RANK="4",
        UPC_LEARNER__LORA_DROPOUT="0",  # dropout masks would differ between the layouts
        UPC_LEARNER__TRAIN_BATCH_SIZE="4",
        UPC_LEARNER__EPOCHS="2",
        UPC_LEARNER__MAX_SEQ_LEN="256",
    )
    cli = [sys.executable, "-m", "chatbot.cli"]
    for args in (
        ["learn", "generate", "--users", "4", "--turns", "2", "--no-progress", "--seed", "5"],
        ["learn", "select", "--iteration", "1"],
    ):
        done = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    shutil.copytree(one, two)
    train = ["learn", "train", "--iteration", "1", "--no-progress"]
    single = subprocess.run([*cli, *train], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    split = subprocess.run(
        [*launcher, "-m", "chatbot.cli", *train],
        env={**env, "UPC_DATA_DIR": str(two)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert split.returncode == 0, split.stdout[-2000:] + split.stderr[-2000:]
    assert split.stdout.count('"adapter_id"') == 1  # printed once, by the first rank
    first, second = json.loads(single.stdout), json.loads(split.stdout)
    assert first["adapter_id"] == second["adapter_id"]  # same data and config: same id
    assert first["metrics"]["steps"] == second["metrics"]["steps"] >= 2
    # Each rank ran its half: all ranks together saw what one process saw, not twice it.
    assert first["metrics"]["ranks"] == 1 and second["metrics"]["ranks"] == 2
    assert first["metrics"]["tokens_trained"] == second["metrics"]["tokens_trained"] > 0
    a, b = _adapter_tensors(one), _adapter_tensors(two)
    assert a.keys() == b.keys() and a
    moved = 0
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name
        moved += int("lora_B" in name and bool(a[name].abs().sum() > 0))
    assert moved  # training really changed the adapter (lora_B starts at zero)
