"""Records of an evaluation: which systems, with what settings, and what each one scored."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from core.types import BASE_ADAPTER, GenerationParams
from learner.checks import TRAIT_REVEAL_SIMILARITY, CheckRegression, CriticFreeChecks
from learner.metrics import DISCOVERY_SIMILARITY, AloeFit, MeanCI
from learner.records import DIMENSIONS, DialogueRecord, PersonaLike, Score
from learner.stats import PairedCI

__all__ = [
    "MAX_TURNS",
    "METRIC_LABELS",
    "SCORE_KEYS",
    "CriticView",
    "EvalConfig",
    "EvalReport",
    "SystemResult",
    "SystemRun",
    "SystemSpec",
    "parse_systems",
]

MAX_TURNS = 10
SCORE_KEYS = (*DIMENSIONS, "mean")
_OPENAI = re.compile(r"^openai:(?P<model>[^@]+)@(?P<url>https?://\S+)$")
# Key -> (label, which way is better: "higher", "lower" or "" when neither), and the
# fixed y-range of its bar plot (None: automatic).
METRIC_LABELS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "rel": ("rel (training critic)", "higher", (1.0, 5.0)),
    "int": ("int (training critic)", "higher", (1.0, 5.0)),
    "val": ("val (training critic)", "higher", (1.0, 5.0)),
    "mean": ("mean (training critic)", "higher", (1.0, 5.0)),
    "eval_mean": ("mean (evaluation critic)", "higher", (1.0, 5.0)),
    "traits_revealed": ("traits revealed / dialogue", "higher", None),
    "distinct_2": ("distinct-2", "higher", (0.0, 1.0)),
    "truncation_rate": ("hit the token cap", "lower", (0.0, 1.0)),
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
    # Dialogues per user and system; a user's value is the mean over its seeds.
    seeds: int = 2
    # Dialogues decoded together; None: every dialogue of a system at once.
    batch_size: int | None = None
    # Generate every system's dialogues at the same time (one thread each): on the local
    # backend their decode steps share batches, one adapter per row.
    parallel_systems: bool = True
    n_boot: int = 2000
    confidence: float = 0.95
    discovery_threshold: float = DISCOVERY_SIMILARITY
    reveal_threshold: float = TRAIT_REVEAL_SIMILARITY
    # A critic-free check regresses when it is worse than the base by more than this share.
    regression_tolerance: float = 0.10
    # Count a trait as discovered when the memory extractor would capture it from the
    # user's messages (rules + MiniLM, as the chat service's default memory does).
    use_memory: bool = True
    repetition_n: int = 3
    perplexity_batch_size: int = 8
    chatbot_params: GenerationParams = field(default_factory=GenerationParams)
    user_params: GenerationParams = field(
        default_factory=lambda: GenerationParams(max_new_tokens=64, temperature=0.8)
    )

    def __post_init__(self) -> None:
        if not 2 <= self.turns <= MAX_TURNS:
            raise ValueError(
                f"turns must be 2 to {MAX_TURNS} (turn 1 is the unscored greeting), "
                f"not {self.turns}"
            )
        if self.seeds < 1:
            raise ValueError("seeds must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CriticView:
    """One critic's figures for one system (scores are per-user means, users resampled)."""

    critic_id: str
    replies: int = 0
    unscored: int = 0
    scores: dict[str, MeanCI] = field(default_factory=dict)
    al: dict[str, dict[int, float]] = field(default_factory=dict)
    aloe: dict[str, AloeFit] = field(default_factory=dict)
    # Key -> persona id -> mean over its seeds of the dialogue mean (for paired bootstrap).
    per_user: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)
    # Key -> candidate minus base (None for the base system itself).
    vs_base: dict[str, PairedCI] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "critic_id": self.critic_id,
            "replies": self.replies,
            "unscored": self.unscored,
            "scores": {k: v.to_dict() for k, v in self.scores.items()},
            "al": {d: {str(k): v for k, v in c.items()} for d, c in self.al.items()},
            "aloe": {d: f.to_dict() for d, f in self.aloe.items()},
            "vs_base": (
                {k: v.to_dict() for k, v in self.vs_base.items()}
                if self.vs_base is not None
                else None
            ),
        }


@dataclass
class SystemRun:
    """What one system produced: dialogues with their users, seeds and evaluation scores."""

    records: list[DialogueRecord]
    personas: list[PersonaLike]
    seeds: list[int]
    eval_scores: list[list[Score]]


@dataclass
class SystemResult:
    name: str
    kind: str
    model_id: str
    adapter: str | None
    train: CriticView
    eval: CriticView
    dialogues: int = 0
    failed: int = 0
    replies: int = 0  # scored turns reached (greetings excluded)
    missing_turns: int = 0  # turns never reached because a dialogue failed
    checks: CriticFreeChecks | None = None
    regressions: list[CheckRegression] | None = None  # None for the base system
    background_similarity: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    discovery_rate: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    discovery_rate_replies: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    traits_total: int = 0
    traits_found: int = 0
    passivity_rate: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    question_rate: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    repetition_rate: MeanCI = field(default_factory=lambda: MeanCI(None, None, None, 0))
    # Spearman between the two critics over this system's replies, per key.
    agreement: dict[str, float | None] | None = None
    elapsed_s: float = 0.0

    def metric(self, key: str) -> MeanCI | None:
        """One headline figure by its ``METRIC_LABELS`` key (checks without interval)."""
        if key in SCORE_KEYS:
            return self.train.scores.get(key)
        if key == "eval_mean":
            return self.eval.scores.get("mean")
        if key in ("perplexity", "traits_revealed", "distinct_2", "truncation_rate"):
            value = self.checks.value(key) if self.checks is not None else None
            n = self.checks.replies if self.checks is not None else 0
            return None if value is None else MeanCI(value, None, None, n)
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
            "missing_turns": self.missing_turns,
            "train": self.train.to_dict(),
            "eval": self.eval.to_dict(),
            "checks": self.checks.to_dict() if self.checks is not None else None,
            "regressions": (
                [r.to_dict() for r in self.regressions] if self.regressions is not None else None
            ),
            "background_similarity": self.background_similarity.to_dict(),
            "discovery_rate": self.discovery_rate.to_dict(),
            "discovery_rate_replies": self.discovery_rate_replies.to_dict(),
            "traits_total": self.traits_total,
            "traits_found": self.traits_found,
            "passivity_rate": self.passivity_rate.to_dict(),
            "question_rate": self.question_rate.to_dict(),
            "repetition_rate": self.repetition_rate.to_dict(),
            "agreement": self.agreement,
            "elapsed_s": round(self.elapsed_s, 3),
        }


@dataclass
class EvalReport:
    created_at: str
    config: dict[str, Any]
    personas: list[str]
    user_model_id: str
    train_critic_id: str
    eval_critic_id: str
    perplexity_model_id: str | None
    base_system: str
    systems: list[SystemResult]
    # Spearman between the two critics over every reply of every system, per key.
    agreement: dict[str, float | None] | None = None
    source: str = ""
    elapsed_s: float = 0.0
    # Per system name: the dialogues (written to transcripts.jsonl, not to report.json).
    runs: dict[str, SystemRun] = field(default_factory=dict, repr=False)

    def system(self, name: str) -> SystemResult:
        for result in self.systems:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "created_at": self.created_at,
            "source": self.source,
            "config": self.config,
            "personas": self.personas,
            "user_model_id": self.user_model_id,
            "train_critic_id": self.train_critic_id,
            "eval_critic_id": self.eval_critic_id,
            "perplexity_model_id": self.perplexity_model_id,
            "base_system": self.base_system,
            "agreement": self.agreement,
            "elapsed_s": round(self.elapsed_s, 3),
            "systems": [s.to_dict() for s in self.systems],
        }
