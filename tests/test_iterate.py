"""The learning loop's stages and the iteration driver: typed results handed on in memory,
one shared model pool, resumable per-stage state."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from core.local_model import LocalModel
from core.prompting import load_prompt
from core.runtime import ModelPool
from core.settings import load_settings
from core.types import BASE_ADAPTER
from learner import stages
from learner.gate import GateDecision, ScoreSet, decide
from learner.iterate import (
    STAGES,
    IterationDriver,
    IterationSteps,
    build_driver,
    format_stage_times,
    format_table,
    load_iteration_state,
)
from learner.records import IterationStats
from learner.registry import GGUF_LORA_FILE, AdapterRegistry, hash_file
from learner.stages import (
    BaseModel,
    GenerationStats,
    LoopParts,
    Selection,
    TrainOutcome,
)
from learner.train import TrainConfig, TrainingStatusStore
from storage.db import Database
from tests.test_train import DIALOGUES, SYSTEM, _fast


def test_iteration_driver_resumes_and_is_idempotent(tiny_model_dir, tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'data' / 'upc.db'}", data_dir=tmp_path / "data")
    registry = AdapterRegistry(tmp_path / "data" / "adapters", db)
    runs = tmp_path / "data" / "runs"
    calls: dict[str, list] = {"generate": [], "select": [], "gate": []}
    crash = {"gate": True}

    def generate(k, users):
        calls["generate"].append(k)
        stats = IterationStats(iteration=k, regeneration_rate=0.25)
        return GenerationStats(
            iteration=k, run_id=f"r{k}", split="train", persona_ids=(), stats=stats
        )

    def select(k):
        calls["select"].append(k)
        run_dir = runs / f"iter-{k:03d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "sft.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DIALOGUES))
        ids = tuple(d["dialogue_id"] for d in DIALOGUES)
        stats = IterationStats(iteration=k, easy_rate=0.5)
        return Selection(iteration=k, run_dir=run_dir, stats=stats, sft_count=2, dialogue_ids=ids)

    def gate(candidate_id, k):
        calls["gate"].append(candidate_id)
        if crash["gate"]:
            crash["gate"] = False
            raise RuntimeError("simulated crash in the gate")
        better = ScoreSet(candidate_id, (5.0,), (4.0,), (4.0,), per_user=(("u1", 4.33),))
        worse = ScoreSet(registry.active_id(), (4.0,), (3.0,), (3.0,), per_user=(("u1", 3.33),))
        return decide(better, worse, margin=0.0)

    driver = IterationDriver(
        runs_dir=runs,
        registry=registry,
        steps=IterationSteps(generate=generate, select=select, gate=gate),
        base=BaseModel(tiny_model_dir, "tiny"),
        train_config=_fast(max_steps=2),
        status=TrainingStatusStore(db),
        system_prompt=SYSTEM,
        retrain_from="parent",
    )
    # --until stops the iteration after a stage; the next run resumes after it.
    with pytest.raises(ValueError, match="unknown stage"):
        driver.run(2, until="evaluate")
    [stopped] = driver.run(2, until="select")
    assert stopped.done == ["generate", "select"] and stopped.adapter_id is None
    assert not stopped.complete and driver.load_state(1).done == ["generate", "select"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        driver.run(2)
    first = driver.load_state(1)
    assert first.done == ["generate", "select", "train"] and first.adapter_id
    assert registry.exists(first.adapter_id) and registry.active_id() == "base"
    # The saved state holds each stage's typed result.
    assert isinstance(first.selection, Selection) and first.selection.run_dir == runs / "iter-001"
    assert isinstance(first.generation, GenerationStats)
    assert first.generation.stats.regeneration_rate == 0.25
    assert isinstance(first.training, TrainOutcome) and first.training.metrics["steps"] == 2

    states = driver.run(2)
    assert [s.iteration for s in states] == [1, 2] and all(s.complete for s in states)
    # Resumed at the gate: nothing before it ran again.
    assert calls["generate"] == [1, 2] and calls["select"] == [1, 2]
    it1, it2 = states[0].adapter_id, states[1].adapter_id
    assert calls["gate"] == [it1, it1, it2]
    assert registry.active_id() == it2 and states[0].promoted and states[1].promoted
    assert isinstance(driver.load_state(2).gate, GateDecision)
    assert driver.load_state(2).gate.candidate_id == it2
    manifest = registry.get(it2)
    assert manifest.parent_id == it1 and manifest.iteration == 2
    sft_hash = hashlib.sha256((runs / "iter-002" / "sft.jsonl").read_bytes()).hexdigest()
    assert manifest.training_dialogue_ids == ["d1", "d2"]
    assert manifest.training_set_hash == sft_hash
    assert manifest.base_model_id == "tiny" and len(manifest.base_weights_sha256) == 64
    assert manifest.metrics["steps"] == 2 and manifest.code_version["package"]
    # Trained adapters are published with their llama.cpp copy, hashed in the manifest.
    assert manifest.files[GGUF_LORA_FILE] == hash_file(registry.path(it2) / GGUF_LORA_FILE)
    assert [m.id for m in registry.list()] == [it1, it2]

    # Idempotent: running again does nothing; a new target runs only the new iteration.
    assert [s.adapter_id for s in driver.run(2)] == [it1, it2]
    assert calls["generate"] == [1, 2]
    table = format_table(states)
    assert "easy" in table.splitlines()[0] and "0.500" in table and "0.250" in table
    times = format_stage_times(states).splitlines()
    assert times[0].split() == ["iter", *STAGES, "total"] and len(times) == 3
    assert all(len(row.split()) == len(STAGES) + 2 for row in times[1:])


def test_a_legacy_state_file_resumes(tmp_path):
    """A state file of the loose-dict era loads; its unreadable gate record is dropped."""
    run_dir = tmp_path / "runs" / "iter-001"
    run_dir.mkdir(parents=True)
    legacy = {
        "iteration": 1,
        "done": ["generate", "select", "train", "gate"],
        "adapter_id": "it001-x",
        "select_stats": {"easy_rate": 0.5},
        "gate": {"promote": True, "reason": "gate disabled by --no-gate"},
        "stage_seconds": {"generate": 1.5},
    }
    (run_dir / "state.json").write_text(json.dumps(legacy))
    state = load_iteration_state(tmp_path / "runs", 1)
    assert state.adapter_id == "it001-x" and state.gate is None and state.selection is None
    assert state.done[-1] == "gate" and state.stage_seconds == {"generate": 1.5}


@pytest.mark.slow
def test_stages_share_one_model_pool(tiny_model_dir, tmp_path, monkeypatch):
    """generate -> select -> train -> gate -> promote -> hot_load called directly with a tiny
    random model, then one more iteration through the driver: typed results throughout, and
    every stage uses the pool handed in (one pool, one model loaded for all roles)."""
    settings = load_settings(
        env={},
        data_dir=tmp_path / "data",
        chatbot__model=str(tiny_model_dir),
        user_sim__model=str(tiny_model_dir),
        critic__model=str(tiny_model_dir),
        chatbot__device="cpu",
        user_sim__device="cpu",
        critic__device="cpu",
        generation__max_new_tokens=8,
        learner__critic="llm",
        learner__gate_critic="llm",
        learner__turns=2,
        learner__max_regenerations=1,
        learner__batch_size=4,
        # A random model's replies are flagged and rarely easy: train on them anyway.
        learner__alpha=1,
        learner__beta=0,
        learner__skip_flagged_targets=False,
        learner__gate_users=2,
        learner__gate_seeds=1,
        learner__gate_margin=-5,
        learner__gate_tolerance=1000,
    )
    pools, loads = [], []
    pool_init, model_init = ModelPool.__init__, LocalModel.__init__

    def counted_pool(self, *args, **kwargs):
        pools.append(self)
        pool_init(self, *args, **kwargs)

    def counted_model(self, *args, **kwargs):
        loads.append(args[0])
        model_init(self, *args, **kwargs)

    monkeypatch.setattr(ModelPool, "__init__", counted_pool)
    monkeypatch.setattr(LocalModel, "__init__", counted_model)
    pool = ModelPool(settings)
    parts = LoopParts.from_settings(settings, pool=pool)
    config = stages.generation_config(settings)
    learner = settings.learner
    try:
        generated = stages.generate(
            parts.pool,
            parts.critic(),
            parts.corpus,
            parts.registry,
            parts.catalog,
            iteration=1,
            users=2,
            config=config,
            alpha=learner.select.alpha,
            beta=learner.select.beta,
        )
        assert isinstance(generated, GenerationStats) and len(generated.persona_ids) == 2
        assert isinstance(generated.stats, IterationStats) and generated.stats.dialogues == 2
        selection = stages.select(
            parts.corpus,
            settings.runs_dir,
            iteration=1,
            config=learner.select,
            accept_threshold=learner.generate.accept_threshold,
        )
        assert isinstance(selection, Selection) and selection.sft_count > 0
        assert selection.sft_path.is_file() and selection.stats.dialogues == 2
        train_config = TrainConfig(lora_rank=8, max_steps=2, device="cpu")
        kwargs = {
            "runs_dir": settings.runs_dir,
            "base": BaseModel.from_settings(settings),
            "config": train_config,
            "parent_id": BASE_ADAPTER,
            "cumulative": True,
            "system_prompt": str(load_prompt("upc_system")),
        }
        trained = stages.train(parts.registry, selection, **kwargs)
        assert isinstance(trained, TrainOutcome) and trained.adapter_id and not trained.reused
        assert trained.metrics["steps"] == 2 and trained.parent_id is None
        again = stages.train(parts.registry, selection, **kwargs)
        assert again.reused and again.adapter_id == trained.adapter_id
        decision = stages.gate(
            parts.registry,
            trained.adapter_id,
            pool=parts.pool,
            critic=parts.critic("gate"),
            personas=stages.gate_users(parts.catalog, learner.gate),
            embedder=parts.embedder,
            config=learner.gate,
            generation=config,
            iteration=1,
        )
        assert isinstance(decision, GateDecision) and decision.candidate_id == trained.adapter_id
        assert decision.baseline_id == BASE_ADAPTER and decision.n_users == 2
        # Both sides' dialogues are kept for reading, one line each (2 users x 1 seed).
        lines = Path(decision.transcripts).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
        assert Path(decision.transcripts).parent == settings.runs_dir / "gates"
        assert [(r["side"], r["adapter"]) for r in rows] == [
            ("candidate", trained.adapter_id),
            ("candidate", trained.adapter_id),
            ("baseline", BASE_ADAPTER),
            ("baseline", BASE_ADAPTER),
        ]
        users = {p.id for p in stages.gate_users(parts.catalog, learner.gate)}
        assert {r["persona_id"] for r in rows} == users and {r["seed"] for r in rows} == {
            learner.gate.gate_seed
        }
        turns = [t for r in rows for t in r["dialogue"]["turns"]]
        assert turns and all("final_score" in t and t["final_reply"] for t in turns)
        assert parts.registry.get(trained.adapter_id).gate["transcripts"] == decision.transcripts
        assert parts.registry.active_id() == BASE_ADAPTER  # the gate never promotes itself
        assert stages.promote(parts.registry, decision) is True
        told: list[str] = []
        assert stages.hot_load(parts.registry, told.append) == trained.adapter_id == told[0]

        # The driver runs the same stages over the same parts.
        driver = build_driver(settings, parts, train_config=train_config)
        state = driver.run_iteration(2, users=2)
        assert state.complete and isinstance(state.generation, GenerationStats)
        assert isinstance(state.selection, Selection) and isinstance(state.gate, GateDecision)
        # Algorithm 2: the active adapter generated iteration 2's corpus.
        run = parts.corpus.get_run(2)
        assert run is not None and run.config["adapter"] == trained.adapter_id
    finally:
        parts.close()
    assert pools == [pool]  # no stage made a pool of its own
    assert len(loads) == 1  # chatbot, simulated user and critic share one loaded model
