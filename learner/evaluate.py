"""The evaluation protocol: several systems, the same users, seeds, simulated user and critic.

Each test user has a T-turn dialogue with each system (the chatbot never sees the
background); the critic scores every reply except the greeting; nothing is regenerated.
Per system the report holds the critic's mean rel/int/val with bootstrap intervals, the
ALOE curve AL(k) with IR, N-IR and R^2, the perplexity of the replies under the base model,
the unscored count, and metrics no training step optimises (background similarity,
discovery, passivity, question and repetition rates). With a second critic every reply is
re-scored and the Spearman agreement between the two critics is reported.

Outputs (``write_outputs``): ``report.json``, ``report.md``, ``report.png`` and
``dialogues.jsonl`` (every dialogue with both critics' scores).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from chatbot.prompting import load_prompt
from chatbot.types import BASE_ADAPTER, ChatModel, GenerationParams
from learner.critic import Critic
from learner.generate import CorpusGenerator, GenerationConfig
from learner.metrics import (
    DISCOVERY_SIMILARITY,
    AloeFit,
    MeanCI,
    ModelRunner,
    PerplexityResult,
    ReplyContext,
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

__all__ = [
    "MAX_TURNS",
    "METRIC_LABELS",
    "EvalConfig",
    "EvalReport",
    "SystemResult",
    "SystemSpec",
    "evaluate",
    "parse_systems",
    "write_outputs",
]

log = logging.getLogger(__name__)

MAX_TURNS = 10
Progress = Callable[[str, int], None]
SCORE_KEYS = (*DIMENSIONS, "mean")
_OPENAI = re.compile(r"^openai:(?P<model>[^@]+)@(?P<url>https?://\S+)$")
# Key -> (label, which way is better: "higher", "lower" or "" when neither), and the
# fixed y-range of its bar plot (None: automatic).
METRIC_LABELS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "rel": ("rel", "higher", (1.0, 5.0)),
    "int": ("int", "higher", (1.0, 5.0)),
    "val": ("val", "higher", (1.0, 5.0)),
    "mean": ("mean(rel,int,val)", "higher", (1.0, 5.0)),
    "background_similarity": ("background similarity", "higher", None),
    "discovery_rate": ("discovery rate", "higher", (0.0, 1.0)),
    "passivity_rate": ("passivity rate", "lower", (0.0, 1.0)),
    # The method wants questions, but not in every reply: neither end is better.
    "question_rate": ("question rate", "", (0.0, 1.0)),
    "repetition_rate": ("repetition rate", "lower", (0.0, 1.0)),
    "perplexity": ("perplexity under base", "lower", None),
}


@dataclass(frozen=True)
class SystemSpec:
    """One system to evaluate: the base model, an adapter, or an OpenAI-compatible model."""

    name: str
    kind: str  # base | adapter | openai
    adapter: str | None = None
    model: str | None = None
    base_url: str | None = None


def parse_systems(text: str) -> list[SystemSpec]:
    """Parse ``base,ADAPTER_ID,openai:MODEL@URL`` (comma-separated, order kept)."""
    specs: list[SystemSpec] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item == BASE_ADAPTER:
            spec = SystemSpec(name=BASE_ADAPTER, kind="base")
        elif item.startswith("openai:"):
            match = _OPENAI.match(item)
            if not match:
                raise ValueError(
                    f"bad system {item!r}: write openai:MODEL@URL, e.g. "
                    "openai:gpt-4o-mini@https://api.openai.com/v1"
                )
            spec = SystemSpec(
                name=f"openai:{match['model']}",
                kind="openai",
                model=match["model"],
                base_url=match["url"],
            )
        else:
            spec = SystemSpec(name=item, kind="adapter", adapter=item)
        if any(s.name == spec.name for s in specs):
            raise ValueError(f"system {spec.name!r} is listed twice")
        specs.append(spec)
    if not specs:
        raise ValueError("no systems to evaluate: give e.g. --systems base,ADAPTER_ID")
    return specs


@dataclass
class EvalConfig:
    turns: int = 5
    seed: int = 0
    batch_size: int = 16
    n_boot: int = 2000
    confidence: float = 0.95
    discovery_threshold: float = DISCOVERY_SIMILARITY
    # Count a trait as discovered when the memory extractor would capture it from the
    # user's messages (rules + MiniLM, as the chat service's default memory does).
    use_memory: bool = True
    repetition_n: int = 3
    perplexity_batch_size: int = 8
    chatbot_params: GenerationParams = field(
        default_factory=lambda: GenerationParams(max_new_tokens=96, temperature=0.7)
    )
    user_params: GenerationParams = field(
        default_factory=lambda: GenerationParams(max_new_tokens=64, temperature=0.8)
    )

    def __post_init__(self) -> None:
        if not 2 <= self.turns <= MAX_TURNS:
            raise ValueError(
                f"turns must be 2 to {MAX_TURNS} (turn 1 is the unscored greeting), "
                f"not {self.turns}"
            )
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SystemResult:
    name: str
    kind: str
    model_id: str
    adapter: str | None
    dialogues: int = 0
    failed: int = 0
    replies: int = 0  # scored turns reached (greetings excluded)
    unscored: int = 0  # replies the critic could not score
    missing_turns: int = 0  # turns never reached because a dialogue failed
    scores: dict[str, MeanCI] = field(default_factory=dict)
    al: dict[str, dict[int, float]] = field(default_factory=dict)
    aloe: dict[str, AloeFit] = field(default_factory=dict)
    perplexity: PerplexityResult | None = None
    background_similarity: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    discovery_rate: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    discovery_rate_replies: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    traits_total: int = 0
    traits_found: int = 0
    passivity_rate: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    question_rate: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    repetition_rate: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    secondary_scores: dict[str, MeanCI] | None = None
    secondary_unscored: int = 0
    agreement: dict[str, float | None] | None = None
    elapsed_s: float = 0.0

    def metric(self, key: str) -> MeanCI | None:
        """One headline figure by its ``METRIC_LABELS`` key (perplexity without interval)."""
        if key in SCORE_KEYS:
            return self.scores.get(key)
        if key == "perplexity":
            if self.perplexity is None or self.perplexity.perplexity is None:
                return None
            value = self.perplexity.perplexity
            return MeanCI(value, None, None, self.perplexity.replies)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "model_id": self.model_id,
            "adapter": self.adapter,
            "dialogues": self.dialogues,
            "failed": self.failed,
            "replies": self.replies,
            "unscored": self.unscored,
            "missing_turns": self.missing_turns,
            "scores": {k: v.to_dict() for k, v in self.scores.items()},
            "al": {d: {str(k): v for k, v in c.items()} for d, c in self.al.items()},
            "aloe": {d: f.to_dict() for d, f in self.aloe.items()},
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "background_similarity": self.background_similarity.to_dict(),
            "discovery_rate": self.discovery_rate.to_dict(),
            "discovery_rate_replies": self.discovery_rate_replies.to_dict(),
            "traits_total": self.traits_total,
            "traits_found": self.traits_found,
            "passivity_rate": self.passivity_rate.to_dict(),
            "question_rate": self.question_rate.to_dict(),
            "repetition_rate": self.repetition_rate.to_dict(),
            "secondary_scores": (
                {k: v.to_dict() for k, v in self.secondary_scores.items()}
                if self.secondary_scores is not None
                else None
            ),
            "secondary_unscored": self.secondary_unscored,
            "agreement": self.agreement,
            "elapsed_s": round(self.elapsed_s, 3),
        }


@dataclass
class EvalReport:
    created_at: str
    config: dict[str, Any]
    personas: list[str]
    user_model_id: str
    critic_id: str
    second_critic_id: str | None
    perplexity_model_id: str | None
    systems: list[SystemResult]
    # Spearman between the two critics over every reply of every system, per dimension.
    agreement: dict[str, float | None] | None = None
    source: str = ""
    elapsed_s: float = 0.0
    # Dialogues per system name (written to dialogues.jsonl, not to report.json).
    dialogues: dict[str, list[DialogueRecord]] = field(default_factory=dict, repr=False)
    secondary: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "created_at": self.created_at,
            "source": self.source,
            "config": self.config,
            "personas": self.personas,
            "user_model_id": self.user_model_id,
            "critic_id": self.critic_id,
            "second_critic_id": self.second_critic_id,
            "perplexity_model_id": self.perplexity_model_id,
            "agreement": self.agreement,
            "elapsed_s": round(self.elapsed_s, 3),
            "systems": [s.to_dict() for s in self.systems],
        }

    def to_markdown(self) -> str:
        return _markdown(self)


# ----------------------------------------------------------------------------- running


def _history_before(record: DialogueRecord, upto: int) -> list[tuple[str, str]]:
    """The chatbot's view before turn number ``upto`` of ``record.turns`` (0-based)."""
    history = [("assistant", record.greeting), ("user", record.user_intro)]
    for turn in record.turns[:upto]:
        history.append(("assistant", turn.final_reply))
        history.append(("user", turn.user_answer))
    return history


def _critic_inputs(persona: PersonaLike, record: DialogueRecord) -> list[CriticInput]:
    return [
        CriticInput(
            user_name=persona.name,
            background=persona.background,
            history=tuple(_history_before(record, i)),
            reply=turn.final_reply,
        )
        for i, turn in enumerate(record.turns)
    ]


def _overall(score: Score) -> float | None:
    if not score.scored:
        return None
    values = [score.value(d) for d in DIMENSIONS]
    return float(np.mean(values))  # type: ignore[arg-type]


def _score_table(scores: Sequence[Score], cfg: EvalConfig) -> dict[str, MeanCI]:
    table = {}
    for i, key in enumerate(SCORE_KEYS):
        values = [(_overall(s) if key == "mean" else s.value(key)) for s in scores if s.scored]
        table[key] = mean_ci(
            values, confidence=cfg.confidence, n_boot=cfg.n_boot, seed=cfg.seed + i
        )
    return table


def _agreement(first: Sequence[Score], second: Sequence[Score]) -> dict[str, float | None]:
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a.scored and b.scored]
    out: dict[str, float | None] = {}
    for key in SCORE_KEYS:
        xs = [(_overall(a) if key == "mean" else a.value(key)) for a, _ in pairs]
        ys = [(_overall(b) if key == "mean" else b.value(key)) for _, b in pairs]
        out[key] = spearman(xs, ys)  # type: ignore[arg-type]
    out["pairs"] = float(len(pairs))
    return out


def _memory_texts(extractor: Any, record: DialogueRecord) -> list[str]:
    if extractor is None:
        return []
    messages = [record.user_intro, *(t.user_answer for t in record.turns)]
    return [fact.text for msg in messages if msg.strip() for fact in extractor.extract(msg)]


def _run_dialogues(
    spec: SystemSpec,
    chatbot: ChatModel,
    personas: Sequence[PersonaLike],
    *,
    user_model: ChatModel,
    critic: Critic,
    cfg: EvalConfig,
    progress: Progress,
) -> list[DialogueRecord]:
    """T-turn dialogues without regeneration (what ``run_dialogues`` does, with progress)."""
    gen_config = GenerationConfig(
        turns=cfg.turns,
        max_regenerations=0,
        batch_size=cfg.batch_size,
        chatbot_params=cfg.chatbot_params,
        user_params=cfg.user_params,
        adapter=spec.adapter,
        seed=cfg.seed,
    )
    generator = CorpusGenerator(chatbot, user_model, critic, gen_config, progress=progress)
    return generator.run(personas).dialogues


def _rate(flags: Sequence[float], cfg: EvalConfig, salt: int) -> MeanCI:
    return mean_ci(flags, confidence=cfg.confidence, n_boot=cfg.n_boot, seed=cfg.seed + salt)


def _measure(
    spec: SystemSpec,
    model_id: str,
    personas: Sequence[PersonaLike],
    records: Sequence[DialogueRecord],
    *,
    cfg: EvalConfig,
    embedder: Any,
    extractor: Any,
    base_runner: ModelRunner | None,
    second: Sequence[Score] | None,
) -> SystemResult:
    result = SystemResult(name=spec.name, kind=spec.kind, model_id=model_id, adapter=spec.adapter)
    result.dialogues = len(records)
    result.failed = sum(1 for r in records if r.status == "failed")
    scores = [t.final_score for r in records for t in r.turns]
    result.replies = len(scores)
    result.unscored = sum(1 for s in scores if not s.scored)
    result.missing_turns = sum(max(0, cfg.turns - 1 - len(r.turns)) for r in records)
    result.scores = _score_table(scores, cfg)
    for key in SCORE_KEYS:
        per_dialogue = [
            {
                t.index: (_overall(t.final_score) if key == "mean" else t.final_score.value(key))
                for t in r.turns
            }
            for r in records
        ]
        result.al[key] = per_turn_al(per_dialogue)
        result.aloe[key] = aloe_fit(result.al[key])

    system_prompt = str(load_prompt("upc_system"))
    contexts: list[ReplyContext] = []
    sims: list[float] = []
    found_any: list[float] = []
    found_replies: list[float] = []
    passive: list[float] = []
    questions: list[float] = []
    repeats: list[float] = []
    for persona, record in zip(personas, records, strict=True):
        replies = [t.final_reply for t in record.turns]
        if not replies:
            continue
        for i, reply in enumerate(replies):
            contexts.append(
                ReplyContext((("system", system_prompt), *_history_before(record, i)), reply)
            )
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
    if base_runner is not None:
        result.perplexity = reply_perplexity(
            contexts, base_runner, batch_size=cfg.perplexity_batch_size
        )
    if second is not None:
        result.secondary_scores = _score_table(second, cfg)
        result.secondary_unscored = sum(1 for s in second if not s.scored)
        result.agreement = _agreement(scores, second)
    return result


def _score_all(
    critic: Critic, items: Sequence[CriticInput], batch_size: int, progress: Progress
) -> list[Score]:
    out: list[Score] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        out.extend(critic.score_batch(chunk))
        progress("rescored", len(chunk))
    return out


def evaluate(
    systems: Sequence[tuple[SystemSpec, ChatModel]],
    personas: Sequence[PersonaLike],
    *,
    user_model: ChatModel,
    critic: Critic,
    second_critic: Critic | None = None,
    embedder: Any = None,
    base_runner: ModelRunner | None = None,
    base_model_id: str | None = None,
    config: EvalConfig | None = None,
    progress: Progress | None = None,
    source: str = "",
) -> EvalReport:
    """Run the protocol for every system on the same personas and seeds.

    ``embedder`` enables the embedding metrics (background similarity, the embedding half of
    discovery, the memory extractor); ``base_runner`` (e.g. ``LocalModel.run_exclusive`` of
    the base model) enables perplexity. ``progress(kind, n)`` receives the generator's
    ``turn``/``dialogue`` events, ``rescored`` replies and one ``system`` event per system.
    """
    cfg = config or EvalConfig()
    if not personas:
        raise ValueError("no users to evaluate")
    if not systems:
        raise ValueError("no systems to evaluate")
    notify = progress or (lambda _kind, _n: None)
    extractor = None
    if cfg.use_memory:
        from chatbot.memory_extract import RulesExtractor

        extractor = RulesExtractor(embedder)
    started = time.perf_counter()
    results: list[SystemResult] = []
    all_dialogues: dict[str, list[DialogueRecord]] = {}
    secondary: dict[str, list[dict[str, Any]]] = {}
    pooled_first: list[Score] = []
    pooled_second: list[Score] = []
    for spec, chatbot in systems:
        t0 = time.perf_counter()
        log.info("evaluating %s on %d users", spec.name, len(personas))
        records = _run_dialogues(
            spec, chatbot, personas, user_model=user_model, critic=critic, cfg=cfg, progress=notify
        )
        second_scores: list[Score] | None = None
        if second_critic is not None:
            items = [
                it for p, r in zip(personas, records, strict=True) for it in _critic_inputs(p, r)
            ]
            second_scores = _score_all(second_critic, items, cfg.batch_size, notify)
            pooled_first.extend(t.final_score for r in records for t in r.turns)
            pooled_second.extend(second_scores)
            secondary[spec.name] = [s.to_dict() for s in second_scores]
        result = _measure(
            spec,
            chatbot.model_id,
            personas,
            records,
            cfg=cfg,
            embedder=embedder,
            extractor=extractor,
            base_runner=base_runner,
            second=second_scores,
        )
        result.elapsed_s = time.perf_counter() - t0
        results.append(result)
        all_dialogues[spec.name] = records
        notify("system", 1)
    return EvalReport(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        config=cfg.to_dict(),
        personas=[p.id for p in personas],
        user_model_id=user_model.model_id,
        critic_id=critic.model_id,
        second_critic_id=second_critic.model_id if second_critic is not None else None,
        perplexity_model_id=base_model_id if base_runner is not None else None,
        systems=results,
        agreement=_agreement(pooled_first, pooled_second) if second_critic is not None else None,
        source=source,
        elapsed_s=time.perf_counter() - started,
        dialogues=all_dialogues,
        secondary=secondary,
    )


# ----------------------------------------------------------------------------- outputs


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci: MeanCI | None, digits: int = 3) -> str:
    if ci is None or ci.mean is None:
        return "n/a"
    if ci.low is None or ci.high is None:
        return _fmt(ci.mean, digits)
    return f"{ci.mean:.{digits}f} [{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


def _fmt_pct(ci: MeanCI) -> str:
    if ci.mean is None:
        return "n/a"
    return f"{100 * ci.mean:.1f}% [{100 * ci.low:.1f}, {100 * ci.high:.1f}]"  # type: ignore[operator]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _markdown(report: EvalReport) -> str:
    cfg = report.config
    conf = round(100 * cfg["confidence"])
    lines = [
        "# UPC evaluation",
        "",
        f"- date: {report.created_at}; users: {len(report.personas)}"
        + (f" ({report.source})" if report.source else "")
        + f"; turns: {cfg['turns']}; seed: {cfg['seed']}",
        f"- simulated user: `{report.user_model_id}`; critic: `{report.critic_id}`"
        + (f"; second critic: `{report.second_critic_id}`" if report.second_critic_id else ""),
        f"- perplexity under: `{report.perplexity_model_id or 'n/a'}`",
        f"- intervals: {conf}% percentile bootstrap over replies ({cfg['n_boot']} resamples)",
        "",
        f"## Critic scores (1-5), mean [{conf}% CI]",
        "",
    ]
    rows = []
    for s in report.systems:
        fit = s.aloe.get("mean")
        rows.append(
            [
                s.name,
                *(_fmt_ci(s.scores.get(k)) for k in SCORE_KEYS),
                _fmt(fit.ir if fit else None),
                _fmt(fit.n_ir if fit else None),
                _fmt(fit.r2 if fit else None),
                f"{s.unscored}/{s.replies}",
                f"{s.failed}/{s.dialogues}",
            ]
        )
    header = ["system", "rel", "int", "val", "mean", "IR", "N-IR", "R²", "unscored", "failed"]
    lines += _table(header, rows)
    lines += ["", "## Independent metrics", ""]
    rows = []
    for s in report.systems:
        ppl = s.perplexity.perplexity if s.perplexity else None
        rows.append(
            [
                s.name,
                _fmt(ppl, 2),
                _fmt_ci(s.background_similarity),
                _fmt_pct(s.discovery_rate),
                _fmt_pct(s.discovery_rate_replies),
                _fmt_pct(s.passivity_rate),
                _fmt_pct(s.question_rate),
                _fmt_pct(s.repetition_rate),
            ]
        )
    header = [
        "system",
        "perplexity",
        "background sim.",
        "discovery",
        "discovery (replies only)",
        "passivity",
        "questions",
        "repetition",
    ]
    lines += _table(header, rows)
    turns = sorted({k for s in report.systems for k in s.al.get("mean", {})})
    lines += ["", "## AL(k): mean(rel,int,val) at turn k", ""]
    rows = [[s.name, *(_fmt(s.al.get("mean", {}).get(k)) for k in turns)] for s in report.systems]
    lines += _table(["system", *(f"k={k}" for k in turns)], rows)
    if report.second_critic_id:
        lines += ["", f"## Second critic `{report.second_critic_id}`", ""]
        rows = [
            [
                s.name,
                *(_fmt_ci((s.secondary_scores or {}).get(k)) for k in SCORE_KEYS),
                *(_fmt((s.agreement or {}).get(k)) for k in SCORE_KEYS),
            ]
            for s in report.systems
        ]
        header = ["system", *SCORE_KEYS, *(f"ρ {k}" for k in SCORE_KEYS)]
        lines += _table(header, rows)
        agree = report.agreement or {}
        lines += [
            "",
            "Spearman ρ between the critics over all "
            f"{int(agree.get('pairs') or 0)} replies: "
            + ", ".join(f"{k} {_fmt(agree.get(k))}" for k in SCORE_KEYS),
        ]
    lines += [
        "",
        "Discovery: share of each user's occupation, education and hobbies that the bot's "
        "replies mention (lexical, or MiniLM cosine >= "
        f"{cfg['discovery_threshold']} with a reply sentence)"
        + (
            " or that the memory extractor captured from the user's messages"
            if cfg["use_memory"]
            else ""
        )
        + "; users without structured traits are left out.",
        "",
    ]
    return "\n".join(lines)


def _plot(report: EvalReport, path: Path) -> None:
    from matplotlib.figure import Figure

    keys = list(METRIC_LABELS)
    cols = 5
    bar_rows = (len(keys) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.4 * (bar_rows + 1.3)), layout="constrained")
    grid = fig.add_gridspec(bar_rows + 1, cols, height_ratios=[1.3] + [1] * bar_rows)
    ax = fig.add_subplot(grid[0, :])
    colors = [f"C{i}" for i in range(len(report.systems))]
    for system, color in zip(report.systems, colors, strict=True):
        curve = system.al.get("mean", {})
        if curve:
            ks = sorted(curve)
            fit = system.aloe.get("mean")
            ir = f", IR {fit.ir:+.3f}" if fit and fit.ir is not None else ""
            ax.plot(ks, [curve[k] for k in ks], marker="o", color=color, label=system.name + ir)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("turn k")
    ax.set_ylabel("AL(k) = mean(rel,int,val)")
    ax.set_title(f"per-turn alignment level ({report.critic_id})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    names = [s.name for s in report.systems]
    for i, key in enumerate(keys):
        axis = fig.add_subplot(grid[1 + i // cols, i % cols])
        label, better, limits = METRIC_LABELS[key]
        means, low_err, high_err = [], [], []
        for system in report.systems:
            ci = system.metric(key)
            mean = ci.mean if ci is not None and ci.mean is not None else np.nan
            means.append(mean)
            if ci is not None and ci.low is not None and ci.high is not None:
                low_err.append(mean - ci.low)
                high_err.append(ci.high - mean)
            else:
                low_err.append(np.nan)
                high_err.append(np.nan)
        axis.bar(range(len(names)), means, color=colors)
        axis.errorbar(
            range(len(names)), means, yerr=[low_err, high_err], fmt="none", ecolor="k", capsize=3
        )
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        axis.set_title(label + (f" ({better} is better)" if better else ""), fontsize=8)
        axis.tick_params(axis="y", labelsize=7)
        if limits is not None:
            axis.set_ylim(*limits)
    fig.savefig(path, dpi=110)


def write_outputs(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, report.png and dialogues.jsonl; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "png": out / "report.png",
        "dialogues": out / "dialogues.jsonl",
    }
    paths["json"].write_text(
        json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    paths["markdown"].write_text(report.to_markdown(), encoding="utf-8")
    with paths["dialogues"].open("w", encoding="utf-8") as fh:
        for name, records in report.dialogues.items():
            second = report.secondary.get(name)
            position = 0
            for record in records:
                row: dict[str, Any] = {"system": name, "dialogue": asdict(record)}
                if second is not None:
                    row["second_scores"] = second[position : position + len(record.turns)]
                    position += len(record.turns)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    _plot(report, paths["png"])
    return paths
