"""The curriculum iteration driver: generate -> select -> train -> gate -> promote -> hot-load.

The stages are the plain functions of `learner.stages`; the driver hands each typed result
to the next one in memory. Each iteration keeps its progress in `runs/iter-KKK/state.json`
(written atomically after every stage, with every stage's typed result), so a crashed run
resumes at the first unfinished stage and a finished one is never redone. Training
publishes under a deterministic id (iteration + hash of training set, parent and config): a
crash between publishing and saving the state is recognised on resume. Hot-loading is
signalled through the registry (`adapters/ACTIVE`), which a running app watches; `notify`
is an optional extra hook.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.prompting import load_prompt
from core.settings import Settings
from core.types import BASE_ADAPTER
from learner import stages
from learner.adapter_manifest import atomic_write
from learner.curriculum import iteration_dir
from learner.gate import GateDecision
from learner.records import IterationStats
from learner.registry import AdapterRegistry
from learner.stages import (
    DEFAULT_USERS,
    BaseModel,
    CorpusProgress,
    GenerationStats,
    LoopParts,
    Selection,
    TrainOutcome,
)
from learner.train import TrainConfig, TrainingStatusStore

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
    """One iteration's progress and the typed result of every stage that ran."""

    iteration: int
    done: list[str] = field(default_factory=list)
    parent_id: str | None = None
    adapter_id: str | None = None
    generation: GenerationStats | None = None  # None: no corpus (a logged retrain)
    selection: Selection | None = None
    training: TrainOutcome | None = None
    gate: GateDecision | None = None
    promoted: bool = False
    active_after: str | None = None
    note: str | None = None
    updated_at: str = ""
    # Wall seconds of each stage that ran (a resumed stage counts its last run).
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(stage in self.done for stage in STAGES)

    def _stats(self, prefer_selection: bool) -> IterationStats | None:
        generated = self.generation.stats if self.generation else None
        selected = self.selection.stats if self.selection else None
        return (selected or generated) if prefer_selection else (generated or selected)

    def row(self) -> dict[str, Any]:
        """The per-iteration summary line."""
        # The easy rate depends on the selection's alpha/beta; regeneration on Algorithm 1.
        easy, regen = self._stats(prefer_selection=True), self._stats(prefer_selection=False)
        cand = self.gate.candidate.get("means", {}) if self.gate else {}
        return {
            "iteration": self.iteration,
            "easy_rate": easy.easy_rate if easy else None,
            "regeneration_rate": regen.regeneration_rate if regen else None,
            "rel": cand.get("rel"),
            "int": cand.get("int"),
            "val": cand.get("val"),
            "adapter": self.adapter_id,
            "heldout_loss": self.training.metrics.get("heldout_loss") if self.training else None,
            "gate_lower": self.gate.lower if self.gate else None,
            "promoted": self.promoted,
            "note": self.note,
        }


@dataclass
class IterationSteps:
    """The stages the driver does not own; each must itself be idempotent per iteration.

    generate(k, users) -> the corpus's stats (None when the iteration generates none);
    select(k) -> the training set; gate(candidate_id, k) -> the decision (without
    promoting); notify(active_id) tells a running app, if any.
    """

    generate: Callable[[int, int | None], GenerationStats | None]
    select: Callable[[int], Selection]
    gate: Callable[[str, int], GateDecision]
    notify: Callable[[str], None] | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _build(annotation: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as ``annotation``: dataclasses, optionals, tuples, paths."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _build(inner[0], value)
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        hints = typing.get_type_hints(annotation)
        known = {f.name for f in dataclasses.fields(annotation)}
        return annotation(**{k: _build(hints[k], v) for k, v in value.items() if k in known})
    if origin is tuple and isinstance(value, list):
        return tuple(_build(typing.get_args(annotation)[0], v) for v in value)
    if annotation is Path:
        return Path(value)
    return value


def _state_from_dict(data: dict[str, Any]) -> IterationState:
    state = IterationState(iteration=int(data["iteration"]))
    hints = typing.get_type_hints(IterationState)
    for f in dataclasses.fields(IterationState):
        if f.name not in data:
            continue
        try:
            setattr(state, f.name, _build(hints[f.name], data[f.name]))
        except (TypeError, ValueError, KeyError) as exc:
            # An older state file's record; the stage reruns if a later one needs it.
            log.warning("iteration %d: ignoring unreadable %s (%s)", state.iteration, f.name, exc)
    return state


def load_iteration_state(runs_dir: Path, k: int) -> IterationState:
    """Iteration k's saved state (an empty one when it has not started)."""
    path = iteration_dir(runs_dir, k) / STATE_FILE
    if not path.is_file():
        return IterationState(iteration=k)
    return _state_from_dict(json.loads(path.read_text(encoding="utf-8")))


def next_iteration(runs_dir: Path) -> int:
    """The first iteration that is not complete."""
    k = 1
    while load_iteration_state(runs_dir, k).complete:
        k += 1
    return k


class IterationDriver:
    """Runs Algorithm 2 iterations with resumable per-stage state."""

    def __init__(
        self,
        *,
        runs_dir: Path,
        registry: AdapterRegistry,
        steps: IterationSteps,
        base: BaseModel,
        train_config: TrainConfig,
        status: TrainingStatusStore | None = None,
        system_prompt: str | None = None,
        progress_bar: bool = False,
        on_stage: Callable[[str, int], None] | None = None,
        retrain_from: str = "base",
    ):
        self.runs_dir = Path(runs_dir)
        self.registry = registry
        self.steps = steps
        self.base = base
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
        data = dataclasses.asdict(state)
        payload = json.dumps(data, indent=2, default=str).encode("utf-8")
        atomic_write(directory / STATE_FILE, payload)

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
        until: str | None = None,
    ) -> list[IterationState]:
        """Run until `iterations` iterations are complete in total (resuming where it stopped).

        ``until`` (a stage name) stops the next unfinished iteration after that stage; a
        later run resumes it at the following stage."""
        if until is not None and until not in STAGES:
            raise ValueError(f"unknown stage {until!r}; one of {', '.join(STAGES)}")
        out = []
        k = self.next_iteration()
        for done in range(1, k):
            out.append(self.load_state(done))
        while k <= iterations:
            state = self.run_iteration(k, users=users, until=until)
            out.append(state)
            if on_iteration is not None:
                on_iteration(state)
            if not state.complete:
                break
            k += 1
        return out

    def run_iteration(
        self, k: int, *, users: int | None = None, until: str | None = None
    ) -> IterationState:
        state = self.load_state(k)
        stop = STAGES.index(until) if until is not None else len(STAGES)

        def due(stage: str) -> bool:
            return stage not in state.done and STAGES.index(stage) <= stop

        if due("generate"):
            self._enter("generate", k)
            state.generation = self.steps.generate(k, users)
            self._mark(state, "generate")
        # An older state file may lack the selection: selecting again is idempotent.
        if due("select") or (
            "train" not in state.done and state.selection is None and stop >= STAGES.index("select")
        ):
            self._enter("select", k)
            state.selection = self.steps.select(k)
            self._mark(state, "select")
        if due("train"):
            self._enter("train", k)
            self._train(state)
            self._mark(state, "train")
        if due("gate"):
            self._enter("gate", k)
            if state.adapter_id is not None:
                state.gate = self.steps.gate(state.adapter_id, k)
            self._mark(state, "gate")
        if due("promote"):
            self._enter("promote", k)
            state.promoted = stages.promote(self.registry, state.gate)
            state.active_after = self.registry.active_id()
            self._mark(state, "promote")
        if due("hotload"):
            self._enter("hotload", k)
            stages.hot_load(self.registry, self.steps.notify)
            self._mark(state, "hotload")
        return state

    def _enter(self, stage: str, k: int) -> None:
        log.info("iteration %d: %s", k, stage)
        self._stage_started = time.perf_counter()
        if self.on_stage is not None:
            self.on_stage(stage, k)

    def _train(self, state: IterationState) -> None:
        assert state.selection is not None  # run_iteration selects first
        if state.parent_id is None:
            # Default: retrain from the base on the cumulative selection (errors don't
            # compound); "parent" continues from the adapter that produced this data.
            continuing = self.retrain_from == "parent"
            state.parent_id = self.registry.active_id() if continuing else BASE_ADAPTER
            self._save(state)
        outcome = stages.train(
            self.registry,
            state.selection,
            runs_dir=self.runs_dir,
            base=self.base,
            config=self.train_config,
            parent_id=state.parent_id,
            cumulative=self.retrain_from == "base",
            status=self.status,
            system_prompt=self.system_prompt,
            progress_bar=self.progress_bar,
        )
        state.training = outcome
        state.adapter_id = outcome.adapter_id
        state.note = outcome.note


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
def build_driver(
    settings: Settings,
    parts: LoopParts,
    *,
    gate: bool = True,
    progress: CorpusProgress | None = None,
    progress_bar: bool = False,
    train_config: TrainConfig | None = None,
) -> IterationDriver:
    """The driver with the product's stages over one set of shared parts: Algorithm 1 with
    the active adapter, the curriculum selection, training, and the gate on validation
    users with its own critic (by default the evaluation critic, which training never sees).

    ``progress`` shows the generate stage; ``progress_bar`` the training run (tqdm).
    """
    learner = settings.learner
    # The gate's dialogues sample as the corpus and serving do.
    config = stages.generation_config(settings)

    def generate_step(k: int, users: int | None) -> GenerationStats:
        # Algorithm 2: the current (active) chatbot generates the next corpus.
        return stages.generate(
            parts.pool,
            parts.critic(),
            parts.corpus,
            parts.registry,
            parts.catalog,
            iteration=k,
            users=users or DEFAULT_USERS,
            config=dataclasses.replace(config, adapter=parts.registry.active_id()),
            alpha=learner.select.alpha,
            beta=learner.select.beta,
            progress=progress,
        )

    def select_step(k: int) -> Selection:
        return stages.select(
            parts.corpus,
            settings.runs_dir,
            iteration=k,
            config=learner.select,
            accept_threshold=learner.generate.accept_threshold,
        )

    def gate_step(candidate_id: str, k: int) -> GateDecision:
        if not gate:
            baseline = parts.registry.active_id()
            return GateDecision.unchecked(candidate_id, baseline, "gate disabled by --no-gate")
        return stages.gate(
            parts.registry,
            candidate_id,
            pool=parts.pool,
            critic=parts.critic("gate"),
            personas=stages.gate_users(parts.catalog, learner.gate),
            embedder=parts.embedder,
            config=learner.gate,
            generation=config,
            iteration=k,
        )

    return IterationDriver(
        runs_dir=settings.runs_dir,
        registry=parts.registry,
        steps=IterationSteps(generate=generate_step, select=select_step, gate=gate_step),
        base=BaseModel.from_settings(settings),
        train_config=train_config or TrainConfig.from_settings(learner.train),
        status=TrainingStatusStore(parts.db),
        system_prompt=str(load_prompt("upc_system")),
        progress_bar=progress_bar,
        retrain_from=learner.train.retrain_from,
    )
