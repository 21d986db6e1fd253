"""Data-parallel generation: two gloo ranks under torchrun make the same corpus as one
process with the same seed (the property that lets users be split across GPUs)."""

from __future__ import annotations

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
