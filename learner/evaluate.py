"""The evaluation protocol: several systems, the same users and seeds, two critics.

Each test user has ``seeds`` T-turn dialogues with each system (the chatbot never sees the
background; nothing is regenerated). All dialogues of a system are in flight at once
through the lockstep generator. Every reply but the greeting is scored by the *training*
critic (the one the learner optimises, during generation) and re-scored by an independent
*evaluation* critic. Per system the report holds, under each critic, the per-user mean
rel/int/val with bootstrap intervals, AL(k) with IR, N-IR and R^2, and the paired user
bootstrap of the difference to the base system; the critic-free checks
(``learner.checks``) with the checks that regressed against the base; and the older
critic-independent metrics (background similarity, discovery, passivity, questions,
repetition). Outputs: ``learner.eval_report.write_outputs``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any

from core.embeddings import Embedder
from core.memory_extract import RulesExtractor
from core.prompting import load_prompt
from core.types import ChatModel
from learner.checks import (
    critic_free_checks,
    history_before,
    regressions,
)
from learner.critic import Critic
from learner.eval_records import (
    SCORE_KEYS,
    CriticView,
    EvalConfig,
    EvalReport,
    SystemResult,
    SystemRun,
    SystemSpec,
)
from learner.generate import CorpusGenerator, GenerationConfig
from learner.metrics import (
    MeanCI,
    ModelRunner,
    aloe_fit,
    background_similarity,
    discovery,
    is_passive,
    is_question,
    mean_ci,
    per_turn_al,
    repetition_scores,
    reply_perplexity,
    spearman,
    structured_traits,
)
from learner.records import DIMENSIONS, CriticInput, DialogueRecord, PersonaLike, Score
from learner.stats import PairedCI, dialogue_mean, paired_bootstrap, per_user_values, score_value

__all__ = ["evaluate_systems"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int], None]


# ----------------------------------------------------------------------------- running


def _critic_inputs(persona: PersonaLike, record: DialogueRecord) -> list[CriticInput]:
    return [
        CriticInput(
            user_name=persona.name,
            background=persona.background,
            history=tuple(history_before(record, i)),
            reply=turn.final_reply,
        )
        for i, turn in enumerate(record.turns)
    ]


def _key_value(score: Score, key: str) -> float | None:
    return score_value(score) if key == "mean" else score.value(key)


def _critic_view(
    critic_id: str,
    records: Sequence[DialogueRecord],
    scores: Sequence[Sequence[Score]],
    cfg: EvalConfig,
) -> CriticView:
    view = CriticView(critic_id=critic_id)
    flat = [s for row in scores for s in row]
    view.replies = len(flat)
    view.unscored = sum(1 for s in flat if not s.scored)
    for i, key in enumerate(SCORE_KEYS):
        dims = DIMENSIONS if key == "mean" else (key,)
        users = per_user_values(
            (r.persona_id, dialogue_mean(row, dims)) for r, row in zip(records, scores, strict=True)
        )
        view.per_user[key] = users
        view.scores[key] = mean_ci(
            list(users.values()), confidence=cfg.confidence, n_boot=cfg.n_boot, seed=cfg.seed + i
        )
        per_dialogue = [
            {t.index: _key_value(s, key) for t, s in zip(r.turns, row, strict=True)}
            for r, row in zip(records, scores, strict=True)
        ]
        view.al[key] = per_turn_al(per_dialogue)
        view.aloe[key] = aloe_fit(view.al[key])
    return view


def _paired(view: CriticView, base: CriticView, cfg: EvalConfig) -> dict[str, PairedCI]:
    return {
        key: paired_bootstrap(
            view.per_user[key],
            base.per_user[key],
            n_boot=cfg.n_boot,
            seed=cfg.seed + 100 + i,
            confidence=cfg.confidence,
        )
        for i, key in enumerate(SCORE_KEYS)
    }


def _agreement(first: Sequence[Score], second: Sequence[Score]) -> dict[str, float | None]:
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a.scored and b.scored]
    out: dict[str, float | None] = {}
    for key in SCORE_KEYS:
        xs = [_key_value(a, key) for a, _ in pairs]
        ys = [_key_value(b, key) for _, b in pairs]
        out[key] = spearman(xs, ys)  # type: ignore[arg-type]
    out["pairs"] = float(len(pairs))
    return out


def _memory_texts(extractor: Any, record: DialogueRecord) -> list[str]:
    if extractor is None:
        return []
    messages = [record.user_intro, *(t.user_answer for t in record.turns)]
    return [fact.text for msg in messages if msg.strip() for fact in extractor.extract(msg)]


def _rate(flags: Sequence[float], cfg: EvalConfig, salt: int) -> MeanCI:
    return mean_ci(flags, confidence=cfg.confidence, n_boot=cfg.n_boot, seed=cfg.seed + salt)


def _independent(
    result: SystemResult,
    run: SystemRun,
    cfg: EvalConfig,
    embedder: Embedder | None,
    extractor: RulesExtractor | None,
) -> None:
    """The critic-independent metrics of the earlier protocol (per reply / per dialogue)."""
    sims: list[float] = []
    found_any: list[float] = []
    found_replies: list[float] = []
    passive: list[float] = []
    questions: list[float] = []
    repeats: list[float] = []
    for persona, record in zip(run.personas, run.records, strict=True):
        replies = [t.final_reply for t in record.turns]
        if not replies:
            continue
        passive.extend(float(is_passive(r)) for r in replies)
        questions.extend(float(is_question(r)) for r in replies)
        repeats.extend(repetition_scores(replies, n=cfg.repetition_n, earlier=[record.greeting]))
        if embedder is not None:
            sims.extend(background_similarity(embedder, replies, persona.background))
        traits = structured_traits(getattr(persona, "traits", None))
        if traits:
            found = discovery(
                traits,
                replies,
                _memory_texts(extractor, record),
                embedder=embedder,
                threshold=cfg.discovery_threshold,
            )
            found_any.append(found.rate)  # type: ignore[arg-type]
            found_replies.append(found.reply_rate)  # type: ignore[arg-type]
            result.traits_total += found.traits
            result.traits_found += found.found
    result.background_similarity = _rate(sims, cfg, 10)
    result.discovery_rate = _rate(found_any, cfg, 11)
    result.discovery_rate_replies = _rate(found_replies, cfg, 12)
    result.passivity_rate = _rate(passive, cfg, 13)
    result.question_rate = _rate(questions, cfg, 14)
    result.repetition_rate = _rate(repeats, cfg, 15)


def _generate(
    spec: SystemSpec,
    chatbot: ChatModel,
    personas: Sequence[PersonaLike],
    *,
    user_model: ChatModel,
    critic: Critic,
    cfg: EvalConfig,
    progress: Progress,
) -> SystemRun:
    """Every user x seed dialogue of one system, in lockstep, without regeneration.

    Seed copies of a user sit at different rows of the batch, and the local backend gives
    each row its own sampling seed, so they are different samples; every system gets the
    same row order, hence the same seeds per user.
    """
    expanded = [p for _ in range(cfg.seeds) for p in personas]
    seeds = [s for s in range(cfg.seeds) for _ in personas]
    gen_config = GenerationConfig(
        turns=cfg.turns,
        max_regenerations=0,
        batch_size=cfg.batch_size or len(expanded),
        chatbot_params=cfg.chatbot_params,
        user_params=cfg.user_params,
        adapter=spec.adapter,
        seed=cfg.seed,
    )
    generator = CorpusGenerator(chatbot, user_model, critic, gen_config, progress=progress)
    records = generator.run(expanded).dialogues
    return SystemRun(records=records, personas=expanded, seeds=seeds, eval_scores=[])


def _generate_all(
    systems: Sequence[tuple[SystemSpec, ChatModel]],
    personas: Sequence[PersonaLike],
    *,
    user_model: ChatModel,
    critic: Critic,
    cfg: EvalConfig,
    progress: Progress,
) -> list[tuple[SystemRun, float]]:
    """Every system's dialogues and their generation seconds, in the order given; with
    ``cfg.parallel_systems`` the systems run at once, one thread each."""

    def one(item: tuple[SystemSpec, ChatModel]) -> tuple[SystemRun, float]:
        spec, chatbot = item
        t0 = time.perf_counter()
        log.info("evaluating %s on %d users x %d seeds", spec.name, len(personas), cfg.seeds)
        run = _generate(
            spec, chatbot, personas, user_model=user_model, critic=critic, cfg=cfg,
            progress=progress,
        )  # fmt: skip
        return run, time.perf_counter() - t0

    if not cfg.parallel_systems or len(systems) < 2:
        return [one(item) for item in systems]
    with ThreadPoolExecutor(max_workers=len(systems), thread_name_prefix="eval") as pool:
        return list(pool.map(one, systems))


def _rescore(
    critic: Critic, run: SystemRun, batch_size: int | None, progress: Progress
) -> list[list[Score]]:
    items = [_critic_inputs(p, r) for p, r in zip(run.personas, run.records, strict=True)]
    flat = [it for row in items for it in row]
    size = batch_size or max(1, len(flat))
    scores: list[Score] = []
    for start in range(0, len(flat), size):
        chunk = flat[start : start + size]
        scores.extend(critic.score_batch(chunk))
        progress("rescored", len(chunk))
    out, cursor = [], 0
    for row in items:
        out.append(scores[cursor : cursor + len(row)])
        cursor += len(row)
    return out


def _measure(
    spec: SystemSpec,
    model_id: str,
    run: SystemRun,
    *,
    train_id: str,
    eval_id: str,
    cfg: EvalConfig,
    embedder: Embedder | None,
    extractor: RulesExtractor | None,
    base_runner: ModelRunner | None,
) -> SystemResult:
    records = run.records
    train_scores = [[t.final_score for t in r.turns] for r in records]
    result = SystemResult(
        name=spec.name,
        kind=spec.kind,
        model_id=model_id,
        adapter=spec.adapter,
        train=_critic_view(train_id, records, train_scores, cfg),
        eval=_critic_view(eval_id, records, run.eval_scores, cfg),
    )
    result.dialogues = len(records)
    result.failed = sum(1 for r in records if r.status == "failed")
    result.replies = sum(len(r.turns) for r in records)
    result.missing_turns = sum(max(0, cfg.turns - 1 - len(r.turns)) for r in records)
    result.agreement = _agreement(
        [s for row in train_scores for s in row], [s for row in run.eval_scores for s in row]
    )
    perplexity = None
    if base_runner is not None:
        perplexity = partial(
            reply_perplexity, run=base_runner, batch_size=cfg.perplexity_batch_size
        )
    result.checks = critic_free_checks(
        records,
        run.personas,
        embedder=embedder,
        perplexity=perplexity,
        system_prompt=str(load_prompt("upc_system")),
        threshold=cfg.reveal_threshold,
    )
    _independent(result, run, cfg, embedder, extractor)
    return result


def _base_name(specs: Sequence[SystemSpec]) -> str:
    """The reference of the paired comparisons: the base model if listed, else the first."""
    for spec in specs:
        if spec.kind == "base":
            return spec.name
    return specs[0].name


def evaluate_systems(
    systems: Sequence[tuple[SystemSpec, ChatModel]],
    personas: Sequence[PersonaLike],
    *,
    user_model: ChatModel,
    train_critic: Critic,
    eval_critic: Critic,
    embedder: Embedder | None = None,
    base_runner: ModelRunner | None = None,
    base_model_id: str | None = None,
    config: EvalConfig | None = None,
    progress: Progress | None = None,
    source: str = "",
) -> EvalReport:
    """Run the protocol for every system on the same users and seeds.

    ``train_critic`` scores during generation (the critic the learner trains against);
    ``eval_critic`` re-scores every reply afterwards. ``embedder`` (MiniLM) enables traits
    revealed, background similarity, the embedding half of discovery and the memory
    extractor; ``base_runner`` (e.g. ``LocalModel.run_exclusive`` of the base model) enables
    perplexity. ``progress(kind, n)`` receives the generator's ``turn``/``dialogue`` events,
    ``rescored`` replies and one ``system`` event per system.
    """
    cfg = config or EvalConfig()
    if not personas:
        raise ValueError("no users to evaluate")
    if not systems:
        raise ValueError("no systems to evaluate")
    ids = [p.id for p in personas]
    if len(set(ids)) != len(ids):
        raise ValueError("each user may be listed once (seeds repeat them)")
    notify = progress or (lambda _kind, _n: None)
    extractor = None
    if cfg.use_memory:
        extractor = RulesExtractor(embedder)
    started = time.perf_counter()
    results: list[SystemResult] = []
    runs: dict[str, SystemRun] = {}
    generated = _generate_all(
        systems, personas, user_model=user_model, critic=train_critic, cfg=cfg, progress=notify
    )
    for (spec, chatbot), (run, generate_s) in zip(systems, generated, strict=True):
        t0 = time.perf_counter()
        run.eval_scores = _rescore(eval_critic, run, cfg.batch_size, notify)
        result = _measure(
            spec,
            chatbot.model_id,
            run,
            train_id=train_critic.model_id,
            eval_id=eval_critic.model_id,
            cfg=cfg,
            embedder=embedder,
            extractor=extractor,
            base_runner=base_runner,
        )
        result.elapsed_s = generate_s + time.perf_counter() - t0
        results.append(result)
        runs[spec.name] = run
        notify("system", 1)
    base_name = _base_name([spec for spec, _ in systems])
    base = next(r for r in results if r.name == base_name)
    for result in results:
        if result is base:
            continue
        result.train.vs_base = _paired(result.train, base.train, cfg)
        result.eval.vs_base = _paired(result.eval, base.eval, cfg)
        if result.checks is not None and base.checks is not None:
            result.regressions = regressions(base.checks, result.checks, cfg.regression_tolerance)
    pooled_train = [t.final_score for run in runs.values() for r in run.records for t in r.turns]
    pooled_eval = [s for run in runs.values() for row in run.eval_scores for s in row]
    return EvalReport(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        config=cfg.to_dict(),
        personas=ids,
        user_model_id=user_model.model_id,
        train_critic_id=train_critic.model_id,
        eval_critic_id=eval_critic.model_id,
        perplexity_model_id=base_model_id if base_runner is not None else None,
        base_system=base_name,
        systems=results,
        agreement=_agreement(pooled_train, pooled_eval),
        source=source,
        elapsed_s=time.perf_counter() - started,
        runs=runs,
    )
