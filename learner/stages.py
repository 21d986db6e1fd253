"""The learning loop's stages, as plain functions with typed results (Algorithm 2).

``generate`` (Algorithm 1) -> `GenerationStats`, ``select`` (the curriculum) -> `Selection`,
``train`` -> `TrainOutcome`, ``gate`` -> `GateDecision`, then ``promote`` and ``hot_load``.
Each takes the parts it needs (one shared `ModelPool`, the critic, the registry, the
stores) as arguments; `LoopParts` holds one set of them. The iteration driver
(`learner.iterate`), the scheduler's jobs (`learner.worker`) and the `upc learn` commands
call these same functions, and the driver hands each result to the next stage in memory.
The files a stage writes under `runs/iter-KKK/` stay as the record of the run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from core.embeddings import Embedder
from core.learner_settings.gate import GateSettings
from core.learner_settings.select import SelectSettings
from core.prompting import load_prompt
from core.runtime import ModelPool, ensure_embedded_model
from core.settings import EMBEDDED_MODEL, Settings
from core.types import BASE_ADAPTER, ChatModel
from learner.checks import CriticFreeChecks, critic_free_checks
from learner.critic import Critic, CriticRole, build_critic, critic_kind
from learner.curriculum import (
    compute_stats,
    copy_recorded_pairs,
    cumulative_paths,
    cumulative_training_files,
    iteration_dir,
    load_training_set,
    personas_for_iteration,
    select_iteration,
)
from learner.distributed import barrier, current_rank, shard_positions
from learner.gate import GateDecision, ensure_adapter, run_gate
from learner.generate import CorpusGenerator, GenerationConfig, run_dialogues
from learner.logged_export import MixResult, build_logged_training_set, mix_into_training_set
from learner.records import DialogueRecord, IterationStats, PersonaLike
from learner.registry import AdapterManifest, AdapterRegistry, code_version, hash_model_weights
from learner.store import CorpusStore
from learner.train import TrainConfig, TrainingStatusStore, train_adapter
from personas.catalog import PersonaCatalog
from storage.db import Database

__all__ = [
    "DEFAULT_USERS",
    "BaseModel",
    "CorpusProgress",
    "GenerationStats",
    "LoopParts",
    "Selection",
    "TrainOutcome",
    "gate",
    "gate_users",
    "generate",
    "generation_config",
    "hot_load",
    "mix_logged",
    "promote",
    "recorded_pairs",
    "select",
    "select_logged",
    "train",
]

log = logging.getLogger(__name__)

# Users per generated corpus when none is asked for.
DEFAULT_USERS = 16


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class GenerationStats:
    """One generate run: its users, what Algorithm 1 measured, how long it took."""

    iteration: int
    run_id: str
    split: str
    persona_ids: tuple[str, ...]
    stats: IterationStats
    resumed: int = 0  # dialogues already finished before this call
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Selection:
    """One iteration's training set: the files `train` reads, and what went into them."""

    iteration: int
    run_dir: Path
    # "pairs": preference pairs recorded by an earlier run, alone (`recorded_pairs`).
    source: Literal["curriculum", "logged", "pairs"] = "curriculum"
    # None for a retrain on logged examples alone (no corpus was generated).
    stats: IterationStats | None = None
    sft_count: int = 0
    pair_count: int = 0
    pending_persona_ids: tuple[str, ...] = ()
    ids_hash: str = ""
    # Set when logged examples were mixed in: the manifest's training ids; otherwise the
    # ids of the trained SFT rows are used.
    dialogue_ids: tuple[str, ...] | None = None
    logged: MixResult | None = None

    @property
    def sft_path(self) -> Path:
        return self.run_dir / "sft.jsonl"

    @property
    def heldout_path(self) -> Path:
        return self.run_dir / "heldout.jsonl"

    @property
    def pairs_path(self) -> Path:
        return self.run_dir / "pairs.jsonl"


@dataclass(frozen=True)
class TrainOutcome:
    """What the train stage published (`learner.train.TrainResult` is the run inside it)."""

    adapter_id: str | None  # None: there was nothing to train on
    parent_id: str | None = None  # None: trained from the base
    # The manifest's metrics (`TrainResult.metrics()`).
    metrics: dict[str, Any] = field(default_factory=dict)
    reused: bool = False  # published by an earlier run that crashed before recording it
    note: str | None = None


@dataclass(frozen=True)
class BaseModel:
    """The weights every adapter is trained on."""

    path: str | Path
    model_id: str

    @classmethod
    def from_settings(cls, settings: Settings) -> BaseModel:
        model = settings.chatbot.model
        if model == EMBEDDED_MODEL:
            return cls(ensure_embedded_model(settings.models_dir), model)
        return cls(model, model)


class CorpusProgress(Protocol):
    """Progress of the generate stage (the CLI shows it as tqdm bars)."""

    def start(self, dialogues: int, turns: int) -> None: ...

    def __call__(self, kind: str, n: int) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------- parts
@dataclass
class LoopParts:
    """The parts the stages share: one database, one model pool, one embedder, the critics.

    The app hands in its own database and pool (`owns_pool=False`), so the loop loads no
    second copy of a model. Critics and the embedder are built on first use.
    """

    settings: Settings
    db: Database
    pool: ModelPool
    owns_pool: bool = True
    _critics: dict[str, Critic] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, db: Database | None = None, pool: ModelPool | None = None
    ) -> LoopParts:
        return cls(
            settings,
            db if db is not None else Database.from_settings(settings),
            pool if pool is not None else ModelPool(settings, batched=True),
            owns_pool=pool is None,
        )

    @functools.cached_property
    def registry(self) -> AdapterRegistry:
        return AdapterRegistry(self.settings.adapters_dir, self.db)

    @functools.cached_property
    def corpus(self) -> CorpusStore:
        return CorpusStore(self.db)

    @functools.cached_property
    def catalog(self) -> PersonaCatalog:
        return PersonaCatalog.load(self.settings)

    @functools.cached_property
    def embedder(self) -> Embedder:
        return Embedder()

    def chatbot(self) -> ChatModel:
        """The serving chatbot's model, from the shared pool."""
        return self.pool.get(self.settings.chatbot)

    def critic(self, role: CriticRole = "train") -> Critic:
        """The critic of a role (`learner.critic.critic_kind`), one per kind."""
        kind = critic_kind(self.settings, role)
        if kind not in self._critics:
            # The llm judge needs no MiniLM; every other critic shares the one embedder.
            embedder = None if kind == "llm" else self.embedder
            self._critics[kind] = build_critic(
                self.settings, kind=kind, pool=self.pool, embedder=embedder
            )
        return self._critics[kind]

    def close(self) -> None:
        if self.owns_pool:
            self.pool.close()


def generation_config(settings: Settings, **overrides: Any) -> GenerationConfig:
    """Algorithm 1's config from the settings; the chatbot samples as it does when serving."""
    gen = settings.learner.generate
    values: dict[str, Any] = {
        "turns": gen.turns,
        "max_regenerations": gen.max_regenerations,
        "accept_threshold": gen.accept_threshold,
        "best_of_n": gen.best_of_n,
        "batch_size": gen.batch_size,
        "chatbot_params": settings.generation.params(),
        # The simulated user: short turns, a little more varied.
        "user_params": settings.generation.params(max_new_tokens=64, temperature=0.8),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationConfig(**values)


# ---------------------------------------------------------------------- generate
def generate(
    pool: ModelPool,
    critic: Critic,
    corpus: CorpusStore,
    registry: AdapterRegistry,
    catalog: PersonaCatalog,
    *,
    iteration: int,
    users: int,
    config: GenerationConfig,
    alpha: int,
    beta: int,
    split: str = "train",
    progress: CorpusProgress | None = None,
) -> GenerationStats:
    """Algorithm 1 for one iteration's users, stored turn by turn (a rerun resumes).

    The users are the unfinished run's, else the previous iteration's difficult ones first
    (`personas_for_iteration`). ``config.adapter`` is the chatbot adapter that generates
    (Algorithm 2: the current one); ``alpha`` and ``beta`` define a difficult turn for the
    statistics.
    """
    if users < 1:
        raise ValueError("users must be 1 or more")
    rank = current_rank()
    if not rank.main:
        barrier(rank)  # the first rank picks the users and opens the run
    existing = corpus.get_run(iteration)
    if existing is not None:
        personas = [catalog.get(pid) for pid in existing.config.get("persona_ids", [])]
        log.info("resuming iteration %d (%d users)", iteration, len(personas))
    else:
        candidates = catalog.all(split=split)
        if not candidates:
            raise ValueError(f"no personas in split {split!r}")
        seed = config.seed or 0
        personas = personas_for_iteration(candidates, corpus, iteration, users, seed=seed)
    chatbot = pool.get(pool.settings.chatbot)
    adapter = config.adapter if config.adapter not in (None, BASE_ADAPTER) else None
    if adapter is not None:
        ensure_adapter(chatbot, registry, adapter)
    config = dataclasses.replace(config, adapter=adapter)
    generator = CorpusGenerator(
        chatbot,
        pool.get(pool.settings.user_sim),
        critic,
        config,
        store=corpus,
        progress=progress,
    )
    run, _resumed = corpus.open_run(
        iteration,
        split=split,
        config={**config.to_dict(), "persona_ids": [p.id for p in personas]},
        models={**generator.model_ids(), "prompt_versions": generator.prompt_versions},
    )
    if rank.main:
        barrier(rank)
    share = shard_positions(personas, rank)
    if progress is not None:
        progress.start(len(share), len(share) * config.turns)
    try:
        result = generator.run(personas, run.id, only=share)
    finally:
        if progress is not None:
            progress.close()
    barrier(rank)  # every rank's share is stored
    stats = compute_stats(corpus.dialogues(run.id), iteration, alpha, beta)
    if rank.main:
        corpus.finish_run(run.id, stats.to_dict(), stats.tokens)
    return GenerationStats(
        iteration=iteration,
        run_id=run.id,
        split=split,
        persona_ids=tuple(p.id for p in personas),
        stats=stats,
        resumed=result.skipped,
        elapsed_s=round(result.elapsed_s, 2),
    )


# ---------------------------------------------------------------------- select
def select(
    corpus: CorpusStore,
    runs_dir: Path,
    *,
    iteration: int,
    config: SelectSettings,
    accept_threshold: int,
) -> Selection:
    """The curriculum's training set of an iteration: its easy dialogues' replies as SFT
    rows (some held out), DPO pairs, and the users to engage again."""
    result = select_iteration(
        corpus,
        runs_dir,
        iteration,
        alpha=config.alpha,
        beta=config.beta,
        accept_threshold=accept_threshold,
        pair_min_gap=config.pair_min_gap,
        holdout_ratio=config.holdout_ratio,
        skip_flagged=config.skip_flagged_targets,
        max_opener_share=config.max_opener_share,
    )
    return Selection(
        iteration=iteration,
        run_dir=result.output_dir,
        stats=result.stats,
        sft_count=result.sft_count,
        pair_count=result.pair_count,
        pending_persona_ids=tuple(result.pending_persona_ids),
        ids_hash=result.ids_hash,
    )


def _training_ids(selection_dir: Path) -> tuple[str, ...]:
    ids: set[str] = set()
    for name in ("sft.jsonl", "pairs.jsonl"):
        path = selection_dir / name
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            ids.update(json.loads(x)["dialogue_id"] for x in lines if x.strip())
    return tuple(sorted(ids))


def _with_logged(selection: Selection, mix: MixResult) -> Selection:
    ids = _training_ids(selection.run_dir)
    return dataclasses.replace(
        selection,
        sft_count=mix.synthetic + mix.real,
        pair_count=selection.pair_count + mix.pairs_real,
        # As `selection.json` records them after the mix.
        dialogue_ids=ids,
        ids_hash=hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest(),
        logged=mix,
    )


def mix_logged(db: Database, selection: Selection, *, ratio: float) -> Selection:
    """Add pending logged examples to a curriculum selection at ``ratio`` (idempotent)."""
    mix = mix_into_training_set(
        db,
        selection.run_dir,
        selection.iteration,
        ratio=ratio,
        system_prompt=str(load_prompt("upc_system")),
    )
    return _with_logged(selection, mix)


def select_logged(db: Database, runs_dir: Path, *, iteration: int, ratio: float) -> Selection:
    """A retrain's training set: pending logged examples plus earlier synthetic SFT rows."""
    mix = build_logged_training_set(
        db, runs_dir, iteration, ratio=ratio, system_prompt=str(load_prompt("upc_system"))
    )
    empty = Selection(iteration=iteration, run_dir=iteration_dir(runs_dir, iteration))
    return _with_logged(dataclasses.replace(empty, source="logged"), mix)


def load_selection(runs_dir: Path, iteration: int) -> Selection:
    """The training set ``upc learn select`` (or an iteration) wrote, its ids hash checked."""
    recorded = load_training_set(runs_dir, iteration)
    return Selection(
        iteration=iteration,
        run_dir=iteration_dir(runs_dir, iteration),
        sft_count=len(recorded.sft),
        pair_count=len(recorded.pairs),
        ids_hash=recorded.ids_hash,
        dialogue_ids=tuple(recorded.dialogue_ids),
    )


def recorded_pairs(runs_dir: Path, iteration: int, pairs_file: Path) -> Selection:
    """A training set of preference pairs alone, recorded by an earlier run (a committed
    `pairs.jsonl.gz` too), checked and copied under `iter-KKK/recorded/`, so an adapter can
    be retrained by another recipe without generating the corpus again."""
    run_dir = iteration_dir(runs_dir, iteration) / "recorded"
    count, ids = copy_recorded_pairs(Path(pairs_file), run_dir / "pairs.jsonl")
    return Selection(
        iteration=iteration, run_dir=run_dir, source="pairs", pair_count=count, dialogue_ids=ids
    )


# ---------------------------------------------------------------------- train
def _hash_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(
    registry: AdapterRegistry,
    selection: Selection,
    *,
    runs_dir: Path,
    base: BaseModel,
    config: TrainConfig,
    parent_id: str,
    cumulative: bool,
    status: TrainingStatusStore | None = None,
    system_prompt: str | None = None,
    progress_bar: bool = False,
) -> TrainOutcome:
    """Train the iteration's adapter on ``selection`` and publish it under a deterministic id.

    ``parent_id`` is `BASE_ADAPTER` or the adapter to continue from. ``cumulative`` (from
    the base only) trains on the selections of iterations 1..K. The id hashes the training
    set, the parent and the config, so an adapter published by a run that crashed before
    recording it is found, verified and reused.
    """
    k = selection.iteration
    sft: Path | None = selection.sft_path
    parent = None if parent_id == BASE_ADAPTER else parent_id
    pairs = selection.pairs_path
    dpo_alone = config.dpo and not config.sft_on
    if selection.source == "pairs":
        if not dpo_alone:
            raise ValueError("recorded pairs train DPO alone: learner.dpo on, learner.epochs 0")
        sft = None
    elif sft is None or not sft.is_file() or not sft.read_text(encoding="utf-8").strip():
        note = "no training examples (no easy dialogue, or every reply was flagged)"
        log.warning("iteration %d: %s", k, note)
        return TrainOutcome(adapter_id=None, parent_id=parent, note=note)
    settings_dict = config.to_dict()
    heldout: Path | None = selection.heldout_path if selection.heldout_path.is_file() else None
    rank = current_rank()  # under torchrun: every rank trains, the first one publishes
    if parent is None and cumulative and k > 1 and sft is not None:
        if rank.main:
            cumulative_training_files(runs_dir, k)
        barrier(rank)
        sft, heldout = cumulative_paths(runs_dir, k)
    set_hash = _hash_file(sft if sft is not None else pairs)
    fingerprint = json.dumps([set_hash, parent, settings_dict], sort_keys=True)
    adapter_id = f"it{k:03d}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:10]}"
    if registry.exists(adapter_id):
        registry.verify(adapter_id)
        log.info("iteration %d: adapter %s already published", k, adapter_id)
        metrics = registry.get(adapter_id).metrics
        return TrainOutcome(adapter_id, parent, metrics=metrics, reused=True)
    staging = selection.run_dir / "adapter-staging"
    if rank.main:
        shutil.rmtree(staging, ignore_errors=True)
    result = train_adapter(
        base.path,
        sft,
        staging,
        config,
        system_prompt=system_prompt,
        parent_adapter_dir=registry.verified_path(parent) if parent else None,
        pairs_path=pairs if pairs.is_file() else None,
        heldout_path=heldout,
        status=status,
        run_id=adapter_id,
        iteration=k,
        adapter_id=adapter_id,
        progress_bar=progress_bar,
    )
    if not rank.main:
        barrier(rank)  # the first rank has published
        return TrainOutcome(adapter_id, parent, metrics=result.metrics())
    manifest = AdapterManifest(
        id=adapter_id,
        parent_id=parent,
        iteration=k,
        base_model_id=base.model_id,
        base_weights_sha256=hash_model_weights(base.path),
        training_config=settings_dict,
        training_dialogue_ids=list(selection.dialogue_ids or result.dialogue_ids),
        training_set_hash=set_hash,
        metrics=result.metrics(),
        code_version=code_version(),
    )
    registry.publish(staging, manifest, base_config=Path(base.path))
    shutil.rmtree(staging, ignore_errors=True)
    barrier(rank)
    return TrainOutcome(adapter_id, parent, metrics=result.metrics())


# ---------------------------------------------------------------------- gate
def gate_users(catalog: PersonaCatalog, config: GateSettings) -> list[PersonaLike]:
    """The validation users the gate talks to."""
    return list(catalog.all(split="validation")[: config.gate_users])


def gate(
    registry: AdapterRegistry,
    candidate_id: str,
    *,
    pool: ModelPool,
    critic: Critic,
    personas: Sequence[PersonaLike],
    embedder: Embedder,
    config: GateSettings,
    generation: GenerationConfig,
    iteration: int | None = None,
) -> GateDecision:
    """Candidate vs the active adapter on the validation users, paired, with the critic-free
    checks; recorded, never promoted here (that is `promote`)."""
    by_id = {p.id: p for p in personas}

    def checks(dialogues: Sequence[DialogueRecord]) -> CriticFreeChecks:
        return critic_free_checks(dialogues, by_id, embedder=embedder)

    return run_gate(
        registry,
        candidate_id,
        chatbot=pool.get(pool.settings.chatbot),
        user_model=pool.get(pool.settings.user_sim),
        critic=critic,
        personas=personas,
        margin=config.gate_margin,
        seed=config.gate_seed,
        n_seeds=config.gate_seeds,
        tolerance=config.gate_tolerance,
        turns=generation.turns,
        iteration=iteration,
        promote=False,
        # The gate's dialogues sample as the corpus and serving do.
        runner=functools.partial(
            run_dialogues,
            chatbot_params=generation.chatbot_params,
            user_params=generation.user_params,
        ),
        checks=checks,
        transcripts_dir=pool.settings.runs_dir / "gates",
    )


# ---------------------------------------------------------------------- promote, hot-load
def promote(registry: AdapterRegistry, decision: GateDecision | None) -> bool:
    """Make the candidate the active adapter when the gate said so; True when it is."""
    if decision is None or not decision.promote:
        return False
    if registry.active_id() != decision.candidate_id:
        registry.activate(decision.candidate_id, reason=decision.reason, action="promote")
    return True


def hot_load(registry: AdapterRegistry, notify: Callable[[str], None] | None = None) -> str:
    """The active adapter, told to ``notify`` (a running app also watches `adapters/ACTIVE`)."""
    active = registry.active_id()
    if notify is not None:
        notify(active)
    return active
