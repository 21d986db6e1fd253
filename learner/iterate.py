"""The curriculum iteration driver: generate -> select -> train -> gate -> promote -> hot-load.

Each iteration keeps its progress in `runs/iter-KKK/state.json` (written atomically after
every stage), so a crashed run resumes at the first unfinished stage and a finished one is
never redone. Training publishes under a deterministic id (iteration + hash of training set,
parent and config): a crash between publishing and saving the state is recognised on resume.
Hot-loading is signalled through the registry (`adapters/ACTIVE`), which a running app
watches; `notify` is an optional extra hook.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.types import BASE_ADAPTER
from learner.curriculum import cumulative_training_files, iteration_dir
from learner.registry import AdapterManifest, AdapterRegistry, _atomic_write, code_version

__all__ = [
    "STAGES",
    "IterationDriver",
    "IterationState",
    "IterationSteps",
    "build_driver",
    "format_stage_times",
    "format_table",
    "load_iteration_state",
    "next_iteration",
]

log = logging.getLogger(__name__)

STAGES = ("generate", "select", "train", "gate", "promote", "hotload")
STATE_FILE = "state.json"


@dataclass
class IterationState:
    iteration: int
    done: list[str] = field(default_factory=list)
    parent_id: str | None = None
    adapter_id: str | None = None
    generate_stats: dict[str, Any] = field(default_factory=dict)
    select_stats: dict[str, Any] = field(default_factory=dict)
    train_metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    promoted: bool = False
    active_after: str | None = None
    note: str | None = None
    updated_at: str = ""
    # Wall seconds of each stage that ran (a resumed stage counts its last run).
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(stage in self.done for stage in STAGES)

    def row(self) -> dict[str, Any]:
        """The per-iteration summary line."""
        stats = {**self.generate_stats, **self.select_stats}
        cand = (self.gate or {}).get("candidate", {}).get("means", {})
        return {
            "iteration": self.iteration,
            "easy_rate": stats.get("easy_rate"),
            "regeneration_rate": stats.get("regeneration_rate"),
            "rel": cand.get("rel"),
            "int": cand.get("int"),
            "val": cand.get("val"),
            "adapter": self.adapter_id,
            "heldout_loss": self.train_metrics.get("heldout_loss"),
            "gate_lower": (self.gate or {}).get("lower"),
            "promoted": self.promoted,
            "note": self.note,
        }


@dataclass
class IterationSteps:
    """The stages the driver does not own; each must itself be idempotent per iteration.

    generate(k, users) -> stats; select(k) -> stats (and writes `sft.jsonl`, `pairs.jsonl`,
    `selection.json` in the iteration's run dir); gate(candidate_id, k) -> a `GateDecision`
    as a dict (without promoting); notify(active_id) tells a running app, if any.
    """

    generate: Callable[[int, int | None], Mapping[str, Any]]
    select: Callable[[int], Mapping[str, Any]]
    gate: Callable[[str, int], Mapping[str, Any]]
    notify: Callable[[str], None] | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_iteration_state(runs_dir: Path, k: int) -> IterationState:
    """Iteration k's saved state (an empty one when it has not started)."""
    path = iteration_dir(runs_dir, k) / STATE_FILE
    if not path.is_file():
        return IterationState(iteration=k)
    data = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(IterationState)}
    return IterationState(**{k2: v for k2, v in data.items() if k2 in known})


def next_iteration(runs_dir: Path) -> int:
    """The first iteration that is not complete."""
    k = 1
    while load_iteration_state(runs_dir, k).complete:
        k += 1
    return k


def _hash_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class IterationDriver:
    """Runs Algorithm 2 iterations with resumable per-stage state."""

    def __init__(
        self,
        *,
        runs_dir: Path,
        registry: AdapterRegistry,
        steps: IterationSteps,
        base_model: str | Path,
        base_model_id: str,
        train_config: Any,
        status: Any = None,
        system_prompt: str | None = None,
        progress_bar: bool = False,
        on_stage: Callable[[str, int], None] | None = None,
        retrain_from: str = "base",
    ):
        self.runs_dir = Path(runs_dir)
        self.registry = registry
        self.steps = steps
        self.base_model = base_model
        self.base_model_id = base_model_id
        self.train_config = train_config
        self.status = status
        self.system_prompt = system_prompt
        self.progress_bar = progress_bar
        # Called with (stage, iteration) before each unfinished stage runs (job progress).
        self.on_stage = on_stage
        if retrain_from not in ("base", "parent"):
            raise ValueError(f"retrain_from must be 'base' or 'parent', not {retrain_from!r}")
        self.retrain_from = retrain_from
        self._stage_started: float | None = None

    # ------------------------------------------------------------------ state
    def run_dir(self, k: int) -> Path:
        return iteration_dir(self.runs_dir, k)

    def load_state(self, k: int) -> IterationState:
        return load_iteration_state(self.runs_dir, k)

    def _save(self, state: IterationState) -> None:
        state.updated_at = _now()
        directory = self.run_dir(state.iteration)
        directory.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(dataclasses.asdict(state), indent=2).encode("utf-8")
        _atomic_write(directory / STATE_FILE, payload)

    def _mark(self, state: IterationState, stage: str) -> None:
        if stage not in state.done:
            state.done.append(stage)
        if self._stage_started is not None:
            state.stage_seconds[stage] = round(time.perf_counter() - self._stage_started, 2)
            self._stage_started = None
        self._save(state)

    def next_iteration(self) -> int:
        return next_iteration(self.runs_dir)

    # ------------------------------------------------------------------ driving
    def run(
        self,
        iterations: int,
        *,
        users: int | None = None,
        on_iteration: Callable[[IterationState], None] | None = None,
    ) -> list[IterationState]:
        """Run until `iterations` iterations are complete in total (resuming where it stopped)."""
        out = []
        k = self.next_iteration()
        for done in range(1, k):
            out.append(self.load_state(done))
        while k <= iterations:
            state = self.run_iteration(k, users=users)
            out.append(state)
            if on_iteration is not None:
                on_iteration(state)
            k += 1
        return out

    def run_iteration(self, k: int, *, users: int | None = None) -> IterationState:
        state = self.load_state(k)
        if "generate" not in state.done:
            self._enter("generate", k)
            state.generate_stats = dict(self.steps.generate(k, users))
            self._mark(state, "generate")
        if "select" not in state.done:
            self._enter("select", k)
            state.select_stats = dict(self.steps.select(k))
            self._mark(state, "select")
        if "train" not in state.done:
            self._enter("train", k)
            self._train(state)
            self._mark(state, "train")
        if "gate" not in state.done:
            self._enter("gate", k)
            if state.adapter_id is not None:
                state.gate = dict(self.steps.gate(state.adapter_id, k))
            self._mark(state, "gate")
        if "promote" not in state.done:
            self._enter("promote", k)
            if state.gate and state.gate.get("promote") and state.adapter_id:
                if self.registry.active_id() != state.adapter_id:
                    self.registry.activate(
                        state.adapter_id, reason=state.gate.get("reason"), action="promote"
                    )
                state.promoted = True
            state.active_after = self.registry.active_id()
            self._mark(state, "promote")
        if "hotload" not in state.done:
            self._enter("hotload", k)
            if self.steps.notify is not None:
                self.steps.notify(self.registry.active_id())
            self._mark(state, "hotload")
        return state

    def _enter(self, stage: str, k: int) -> None:
        log.info("iteration %d: %s", k, stage)
        self._stage_started = time.perf_counter()
        if self.on_stage is not None:
            self.on_stage(stage, k)

    def _train(self, state: IterationState) -> None:
        from learner.train import train_adapter

        k = state.iteration
        run_dir = self.run_dir(k)
        sft = run_dir / "sft.jsonl"
        if not sft.is_file() or not sft.read_text(encoding="utf-8").strip():
            state.adapter_id = None
            state.note = "no training examples (no easy dialogue, or every reply was flagged)"
            log.warning("iteration %d: %s", k, state.note)
            return
        if state.parent_id is None:
            # Default: retrain from the base on the cumulative selection (errors don't
            # compound); "parent" continues from the adapter that produced this data.
            continuing = self.retrain_from == "parent"
            state.parent_id = self.registry.active_id() if continuing else BASE_ADAPTER
            self._save(state)
        parent = None if state.parent_id == BASE_ADAPTER else state.parent_id
        config = self.train_config.to_dict()
        selection = _read_json(run_dir / "selection.json")
        heldout: Path | None = None
        set_hash = selection.get("hash") or _hash_file(sft)
        if parent is None and self.retrain_from == "base" and k > 1:
            sft, heldout = cumulative_training_files(self.runs_dir, k)
            set_hash = _hash_file(sft)
        elif (run_dir / "heldout.jsonl").is_file():
            heldout = run_dir / "heldout.jsonl"
        fingerprint = json.dumps([set_hash, parent, config], sort_keys=True)
        adapter_id = f"it{k:03d}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:10]}"
        state.adapter_id = adapter_id
        if self.registry.exists(adapter_id):
            self.registry.verify(adapter_id)
            state.train_metrics = self.registry.get(adapter_id).metrics
            log.info("iteration %d: adapter %s already published", k, adapter_id)
            return
        staging = run_dir / "adapter-staging"
        shutil.rmtree(staging, ignore_errors=True)
        pairs = run_dir / "pairs.jsonl"
        result = train_adapter(
            self.base_model,
            sft,
            staging,
            self.train_config,
            system_prompt=self.system_prompt,
            parent_adapter_dir=self.registry.verified_path(parent) if parent else None,
            pairs_path=pairs if pairs.is_file() else None,
            heldout_path=heldout,
            status=self.status,
            run_id=f"{adapter_id}",
            iteration=k,
            adapter_id=adapter_id,
            progress_bar=self.progress_bar,
        )
        from learner.registry import hash_model_weights

        manifest = AdapterManifest(
            id=adapter_id,
            parent_id=parent,
            iteration=k,
            base_model_id=self.base_model_id,
            base_weights_sha256=hash_model_weights(self.base_model),
            training_config=config,
            training_dialogue_ids=selection.get("dialogue_ids") or result.dialogue_ids,
            training_set_hash=set_hash,
            metrics=result.metrics(),
            code_version=code_version(),
        )
        self.registry.publish(staging, manifest)
        shutil.rmtree(staging, ignore_errors=True)
        state.train_metrics = result.metrics()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s is not valid JSON; ignoring it", path)
        return {}
    return data if isinstance(data, dict) else {}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(states: list[IterationState]) -> str:
    """Plain-text table: easy rate, regeneration rate, validation rel/int/val, promoted."""
    header = ["iter", "easy", "regen", "rel", "int", "val", "heldout", "gate lb", "adapter"]
    header += ["promoted"]
    rows = [header]
    for state in states:
        r = state.row()
        rows.append(
            [
                _fmt(r["iteration"]),
                _fmt(r["easy_rate"]),
                _fmt(r["regeneration_rate"]),
                _fmt(r["rel"]),
                _fmt(r["int"]),
                _fmt(r["val"]),
                _fmt(r["heldout_loss"]),
                _fmt(r["gate_lower"]),
                _fmt(r["adapter"]),
                _fmt(r["promoted"]) + (f" ({r['note']})" if r["note"] else ""),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def format_stage_times(states: list[IterationState]) -> str:
    """Per-stage wall time of each iteration, in seconds."""
    rows = [["iter", *STAGES, "total"]]
    for state in states:
        secs = [state.stage_seconds.get(stage) for stage in STAGES]
        total = sum(x for x in secs if x is not None)
        rows.append([str(state.iteration), *(_fmt(x) for x in secs), f"{total:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


# ---------------------------------------------------------------------- default wiring
def _learn_cli(settings: Any, argv: list[str]) -> None:
    """Run a `upc learn ...` subcommand in-process (generate/select belong to learner.cli)."""
    from learner import cli as learn_cli

    parser = argparse.ArgumentParser(prog="upc")
    learn_cli.register(parser.add_subparsers(dest="group"))
    args = parser.parse_args(argv)
    rc = args.func(args, settings)
    if rc:
        raise RuntimeError(f"upc {' '.join(argv)} failed with exit status {rc}")


def _resolve_base(settings: Any) -> tuple[str | Path, str]:
    from core.settings import EMBEDDED_MODEL

    model = settings.chatbot.model
    if model == EMBEDDED_MODEL:
        from core.runtime import ensure_embedded_model

        return ensure_embedded_model(settings.models_dir), model
    return model, model


def _gate_resources(settings: Any) -> dict[str, Any]:
    """The gate's parts: the chatbot, the simulated user, the gate critic (by default the
    evaluation critic, which training never sees), the validation users and the
    critic-free checks."""
    from core.embeddings import Embedder
    from core.runtime import build_model
    from learner.checks import critic_free_checks
    from learner.critic import build_critic, critic_kind
    from personas.catalog import PersonaCatalog

    chatbot = build_model(settings.chatbot, settings)
    same = dataclasses.asdict(settings.user_sim) == dataclasses.asdict(settings.chatbot)
    user_model = chatbot if same else build_model(settings.user_sim, settings)
    kind = critic_kind(settings, "gate")
    judge = build_model(settings.critic, settings) if kind == "llm" else None
    embedder = Embedder()
    critic = build_critic(settings, judge, embedder, kind=kind)
    personas = PersonaCatalog.load().all(split="validation")[: settings.learner.gate.gate_users]
    by_id = {p.id: p for p in personas}

    def checks(dialogues: Any) -> Any:
        return critic_free_checks(dialogues, by_id, embedder=embedder)

    return {
        "chatbot": chatbot,
        "user_model": user_model,
        "critic": critic,
        "personas": personas,
        "checks": checks,
    }


def build_driver(settings: Any, *, gate: bool = True, progress_bar: bool = True) -> IterationDriver:
    """The driver with the product's parts: `upc learn generate/select`, the embedded or
    configured chatbot, the configured critic and the validation users for the gate."""
    from core.prompting import load_prompt
    from learner.cli import generation_config
    from learner.gate import run_gate
    from learner.generate import run_dialogues
    from learner.train import TrainConfig, TrainingStatusStore
    from storage.db import Database

    db = Database.from_settings(settings)
    registry = AdapterRegistry(settings.adapters_dir, db)
    base_model, base_model_id = _resolve_base(settings)
    resources: dict[str, Any] = {}

    def generate(k: int, users: int | None) -> Mapping[str, Any]:
        argv = ["learn", "generate", "--split", "train", "--iteration", str(k)]
        argv += ["--users", str(users)] if users else []
        # Algorithm 2: the current (active) chatbot generates the next corpus.
        active = registry.active_id()
        argv += ["--adapter", active] if active != BASE_ADAPTER else []
        _learn_cli(settings, argv)
        return {}

    def select(k: int) -> Mapping[str, Any]:
        _learn_cli(settings, ["learn", "select", "--iteration", str(k)])
        selection = _read_json(iteration_dir(settings.runs_dir, k) / "selection.json")
        return selection.get("stats") or {}

    # The gate's dialogues use the same generation settings as the corpus and serving.
    params = generation_config(settings)

    def gate_step(candidate_id: str, k: int) -> Mapping[str, Any]:
        if not gate:
            return {"promote": True, "reason": "gate disabled by --no-gate"}
        if not resources:
            resources.update(_gate_resources(settings))
        decision = run_gate(
            registry,
            candidate_id,
            margin=settings.learner.gate.gate_margin,
            seed=settings.learner.gate.gate_seed,
            n_seeds=settings.learner.gate.gate_seeds,
            tolerance=settings.learner.gate.gate_tolerance,
            turns=settings.learner.generate.turns,
            iteration=k,
            promote=False,
            runner=functools.partial(
                run_dialogues,
                chatbot_params=params.chatbot_params,
                user_params=params.user_params,
            ),
            **resources,
        )
        return decision.to_dict()

    return IterationDriver(
        runs_dir=settings.runs_dir,
        registry=registry,
        steps=IterationSteps(generate=generate, select=select, gate=gate_step),
        base_model=base_model,
        base_model_id=base_model_id,
        train_config=TrainConfig.from_settings(settings.learner.train),
        status=TrainingStatusStore(db),
        system_prompt=str(load_prompt("upc_system")),
        progress_bar=progress_bar,
        retrain_from=settings.learner.train.retrain_from,
    )
