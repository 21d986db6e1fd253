"""Typed records of the learner: scores, turns, dialogues, statistics, preference pairs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DIMENSIONS",
    "Attempt",
    "CriticInput",
    "DialogueRecord",
    "DimensionMeans",
    "IterationStats",
    "PersonaLike",
    "PreferencePair",
    "Score",
    "TokenCounts",
    "TurnRecord",
]

DIMENSIONS: tuple[str, ...] = ("rel", "int", "val")


@runtime_checkable
class PersonaLike(Protocol):
    """What the learner needs of a persona (``personas.catalog.Persona`` satisfies it)."""

    id: str
    name: str
    background: str


@dataclass(frozen=True)
class CriticInput:
    """One reply to judge: who the user is, what was said before, and the reply."""

    user_name: str
    background: str
    # (role, content) pairs from the chatbot's point of view: "assistant" is the bot.
    history: tuple[tuple[str, str], ...]
    reply: str

    @property
    def last_user_message(self) -> str:
        for role, content in reversed(self.history):
            if role == "user":
                return content
        return ""


@dataclass
class Score:
    """Scores of one reply; ``rel``/``int``/``val`` are None when the reply is unscored."""

    rel: int | None = None
    int: int | None = None  # the method's name for the interest dimension
    val: int | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    raw: str = ""
    critic_model_id: str = ""
    # Logit path only: expected values and the probability of each of 1..5 per dimension.
    expected: dict[str, float] | None = None
    distribution: dict[str, list[float]] | None = None
    attempts: int = 1
    tokens: int = 0

    @property
    def scored(self) -> bool:
        return self.rel is not None and self.int is not None and self.val is not None

    def get(self, dim: str) -> int | None:
        if dim not in DIMENSIONS:
            raise KeyError(dim)
        return getattr(self, dim)

    def value(self, dim: str) -> float | None:
        """The expected value where the critic gave a distribution, else the integer score."""
        if self.expected is not None and dim in self.expected:
            return self.expected[dim]
        score = self.get(dim)
        return None if score is None else float(score)

    def mean(self) -> float | None:
        """Mean of the three dimensions (expected values where given); None if unscored."""
        values = [self.value(d) for d in DIMENSIONS]
        if any(v is None for v in values):
            return None
        return sum(values) / len(values)  # type: ignore[arg-type]

    def failing(self, threshold: int) -> list[str]:
        """Dimensions scored below ``threshold`` (empty for an unscored reply)."""
        if not self.scored:
            return []
        return [d for d in DIMENSIONS if self.get(d) < threshold]  # type: ignore[operator]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Score:
        if not data:
            return cls()
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def unscored(cls, raw: str, critic_model_id: str, attempts: int, tokens: int = 0) -> Score:
        return cls(raw=raw, critic_model_id=critic_model_id, attempts=attempts, tokens=tokens)


@dataclass
class TokenCounts:
    chatbot: int = 0
    user: int = 0
    critic: int = 0

    def add(self, role: str, n: int) -> None:
        setattr(self, role, getattr(self, role) + int(n))

    def merge(self, other: TokenCounts) -> None:
        for role in ("chatbot", "user", "critic"):
            self.add(role, getattr(other, role))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Attempt:
    """One candidate reply of a turn: the first try, a plain resample or a critique-guided
    regeneration, with its scores and the reply checks that fired."""

    kind: str  # first | resample | regen
    reply: str
    score: Score
    finish_reason: str = ""
    flags: tuple[str, ...] = ()
    usable: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        return cls(
            kind=str(data.get("kind", "")),
            reply=str(data.get("reply", "")),
            score=Score.from_dict(data.get("score")),
            finish_reason=str(data.get("finish_reason", "")),
            flags=tuple(data.get("flags") or ()),
            usable=bool(data.get("usable", True)),
        )


@dataclass
class TurnRecord:
    """One scored chatbot turn (t >= 2) of Algorithm 1.

    ``first_*`` is the first attempt; ``final_*`` the best-scoring usable attempt, which the
    dialogue continues with; ``attempts`` every candidate in the order it was made.
    """

    index: int
    user_message: str
    first_reply: str
    first_score: Score
    final_reply: str
    final_score: Score
    regenerations: int = 0
    apology_retries: int = 0
    user_answer: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    final_finish_reason: str = ""

    def accepted(self, threshold: int) -> bool:
        return self.final_score.scored and not self.final_score.failing(threshold)

    def improved_dimensions(self) -> int:
        """How many dimensions rose from the first attempt to the final reply."""
        if not (self.first_score.scored and self.final_score.scored):
            return 0
        return sum(
            1
            for d in DIMENSIONS
            if self.final_score.get(d) - self.first_score.get(d) > 0  # type: ignore[operator]
        )


@dataclass
class DialogueRecord:
    id: str
    persona_id: str
    persona_name: str
    status: str = "running"  # running | done | failed
    cause: str | None = None
    greeting: str = ""
    user_intro: str = ""
    turns: list[TurnRecord] = field(default_factory=list)
    tokens: TokenCounts = field(default_factory=TokenCounts)
    chatbot_model_id: str = ""
    user_model_id: str = ""
    critic_model_id: str = ""
    adapter: str | None = None
    prompt_versions: dict[str, str] = field(default_factory=dict)

    def messages(self, system_prompt: str) -> list[dict[str, str]]:
        """The dialogue as chat messages with the final (accepted) replies."""
        out = [
            {"role": "system", "content": system_prompt},
            {"role": "assistant", "content": self.greeting},
            {"role": "user", "content": self.user_intro},
        ]
        for turn in self.turns:
            out.append({"role": "assistant", "content": turn.final_reply})
            if turn.user_answer:
                out.append({"role": "user", "content": turn.user_answer})
        return out


@dataclass
class DimensionMeans:
    rel: float | None = None
    int: float | None = None
    val: float | None = None


@dataclass
class IterationStats:
    iteration: int
    dialogues: int = 0
    done: int = 0
    failed: int = 0
    failure_causes: dict[str, int] = field(default_factory=dict)
    turns: int = 0
    regenerated_turns: int = 0
    regenerations: int = 0
    regeneration_rate: float = 0.0
    avg_regenerations: float = 0.0
    easy: int = 0
    easy_rate: float = 0.0
    unscored: int = 0
    first_means: DimensionMeans = field(default_factory=DimensionMeans)
    final_means: DimensionMeans = field(default_factory=DimensionMeans)
    tokens: TokenCounts = field(default_factory=TokenCounts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PreferencePair:
    pair_id: str
    dialogue_id: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    # The rejected reply hit the token cap (trimmed to its last sentence): its end-of-turn
    # was never generated.
    rejected_capped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
