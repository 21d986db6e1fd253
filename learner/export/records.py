"""The export's typed records: one conversation, its turns and scores; options; results.

Schema convention (kept identical in every format so that `datasets.load_dataset("json")`
infers one stable schema): absent strings are `""`, absent scores / ratings / counts are `0`
(critic scores are 1..5), absent floats are `0.0`, and real conversations have iteration -1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from learner.pii import ScrubCounts

__all__ = [
    "FEEDBACK_CHOICES",
    "FORMATS",
    "FORMAT_FILES",
    "HF_ZIP",
    "SALT_ENV",
    "SOURCES",
    "BotAttempt",
    "ConversationMeta",
    "CriticScores",
    "ExportCancelled",
    "ExportError",
    "ExportFilters",
    "ExportOptions",
    "ExportPathError",
    "ExportProgress",
    "ExportRecord",
    "ExportResult",
    "TurnMeta",
    "iso",
]

FORMATS: tuple[str, ...] = ("jsonl", "sharegpt", "parquet", "hf")
FORMAT_FILES: dict[str, str] = {
    "jsonl": "dialogues.jsonl",
    "sharegpt": "dialogues.sharegpt.json",
    "parquet": "messages.parquet",
    "hf": "hf_dataset",
}
HF_ZIP = "hf_dataset.zip"
SOURCES: tuple[str, ...] = ("real", "synthetic", "regenerated")
FEEDBACK_CHOICES: tuple[str, ...] = ("any", "liked", "disliked", "none")
SALT_ENV = "UPC_EXPORT_SALT"


class ExportError(ValueError):
    """Bad export options (unknown user, bad filter, existing export id, ...)."""


class ExportPathError(ExportError):
    """A download request that does not name a file inside an export directory."""


class ExportCancelled(RuntimeError):
    """The caller's `cancel()` returned True; the partial export was removed."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CriticScores:
    """Critic scores of one reply (0 = not scored) with the critic's reason per dimension."""

    rel: int = 0
    int: int = 0  # the method's name for the interest dimension
    val: int = 0
    reason_rel: str = ""
    reason_int: str = ""
    reason_val: str = ""
    critic_model_id: str = ""

    @property
    def scored(self) -> bool:
        return self.rel > 0 and self.int > 0 and self.val > 0

    @property
    def mean(self) -> float:
        return (self.rel + self.int + self.val) / 3.0 if self.scored else 0.0

    @classmethod
    def from_score_dict(cls, data: Mapping[str, Any] | None) -> CriticScores:
        """From the learner's `Score.to_dict()` form (`rel`, `int`, `val`, `reasons`)."""
        if not data:
            return cls()
        reasons = data.get("reasons") or {}
        return cls(
            rel=int(data.get("rel") or 0),
            int=int(data.get("int") or 0),
            val=int(data.get("val") or 0),
            reason_rel=str(reasons.get("rel") or ""),
            reason_int=str(reasons.get("int") or ""),
            reason_val=str(reasons.get("val") or ""),
            critic_model_id=str(data.get("critic_model_id") or ""),
        )

    def scrubbed(self, fn: Callable[[str], str]) -> CriticScores:
        return CriticScores(
            self.rel,
            self.int,
            self.val,
            fn(self.reason_rel),
            fn(self.reason_int),
            fn(self.reason_val),
            self.critic_model_id,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rel": self.rel,
            "int": self.int,
            "val": self.val,
            "mean": float(self.mean),
            "reasons": {"rel": self.reason_rel, "int": self.reason_int, "val": self.reason_val},
            "critic_model_id": self.critic_model_id,
        }


@dataclass(frozen=True)
class BotAttempt:
    """One version of a bot turn. `origin`: initial | critic (critic-requested regeneration)
    | user (user pressed regenerate)."""

    content: str
    origin: str
    critic: CriticScores = field(default_factory=CriticScores)
    feedback: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "origin": self.origin,
            "critic": self.critic.to_json(),
            "feedback": self.feedback,
        }


@dataclass
class TurnMeta:
    """Metadata of one message, parallel to the `messages` list (user turns keep defaults)."""

    role: str
    message_id: str = ""
    seq: int = 0
    created_at: str = ""
    status: str = "complete"
    adapter_id: str = ""
    model_id: str = ""
    critic: CriticScores = field(default_factory=CriticScores)
    first_critic: CriticScores = field(default_factory=CriticScores)
    regenerations: int = 0
    regeneration_history: list[BotAttempt] = field(default_factory=list)
    feedback: int = 0  # +1 liked, -1 disliked, 0 none
    feedback_reason: str = ""
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gen_params_json: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "message_id": self.message_id,
            "seq": self.seq,
            "created_at": self.created_at,
            "status": self.status,
            "adapter_id": self.adapter_id,
            "model_id": self.model_id,
            "critic": self.critic.to_json(),
            "first_critic": self.first_critic.to_json(),
            "regenerations": self.regenerations,
            "regeneration_history": [a.to_json() for a in self.regeneration_history],
            "feedback": self.feedback,
            "feedback_reason": self.feedback_reason,
            "latency_ms": float(self.latency_ms),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "gen_params_json": self.gen_params_json,
        }


@dataclass
class ConversationMeta:
    id: str
    source: str  # real | synthetic
    created_at: str
    updated_at: str = ""
    split: str = ""  # synthetic: train | validation | test
    user: str = ""  # salted hash of the user id ("" for synthetic)
    title: str = ""
    persona_id: str = ""
    iteration: int = -1
    status: str = "complete"
    adapter_ids: list[str] = field(default_factory=list)
    n_messages: int = 0
    n_bot_turns: int = 0
    regenerated: bool = False
    regenerations: int = 0
    mean_rel: float = 0.0
    mean_int: float = 0.0
    mean_val: float = 0.0
    mean_score: float = 0.0
    likes: int = 0
    dislikes: int = 0
    chatbot_model_id: str = ""
    critic_model_id: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("mean_rel", "mean_int", "mean_val", "mean_score"):
            data[key] = float(data[key])
        return data


@dataclass
class ExportRecord:
    meta: ConversationMeta
    messages: list[tuple[str, str]]  # (role, content)
    turns: list[TurnMeta]

    def finalize(self) -> None:
        """Fill the conversation-level aggregates from the turns."""
        bots = [t for t in self.turns if t.role == "assistant"]
        scored = [t.critic for t in bots if t.critic.scored]
        meta = self.meta
        meta.n_messages = len(self.messages)
        meta.n_bot_turns = len(bots)
        meta.adapter_ids = sorted({t.adapter_id for t in bots if t.adapter_id})
        meta.regenerations = sum(t.regenerations for t in bots)
        meta.regenerated = meta.regenerations > 0
        meta.likes = sum(1 for t in bots if t.feedback > 0)
        meta.dislikes = sum(1 for t in bots if t.feedback < 0)
        if scored:
            n = len(scored)
            meta.mean_rel = sum(s.rel for s in scored) / n
            meta.mean_int = sum(s.int for s in scored) / n
            meta.mean_val = sum(s.val for s in scored) / n
            meta.mean_score = sum(s.mean for s in scored) / n
        if not meta.critic_model_id and scored:
            meta.critic_model_id = scored[0].critic_model_id

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": [{"role": r, "content": c} for r, c in self.messages],
            "upc": self.meta.to_json(),
            "upc_turns": [t.to_json() for t in self.turns],
        }


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ExportFilters:
    """Which conversations to export. Empty / None means no restriction.

    `sources` is a union: "real" and "synthetic" select by origin, "regenerated" adds any
    conversation with at least one regenerated bot turn. `min_score` / `max_score` bound the
    conversation's mean critic score (unscored conversations fail any score bound).
    `feedback`: liked / disliked = at least one such bot turn; none = no feedback at all.
    """

    since: datetime | None = None
    until: datetime | None = None  # exclusive
    users: tuple[str, ...] = ()  # usernames or user ids
    adapters: tuple[str, ...] = ()
    min_score: float | None = None
    max_score: float | None = None
    sources: tuple[str, ...] = ("real", "synthetic")
    feedback: str = "any"
    include_opted_out: bool = False  # users excluded from training / not opted in

    def validate(self) -> None:
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise ExportError(
                f"sources must be a non-empty subset of {SOURCES}, got {self.sources}"
            )
        if self.feedback not in FEEDBACK_CHOICES:
            raise ExportError(f"feedback must be one of {FEEDBACK_CHOICES}, got {self.feedback!r}")
        for name in ("min_score", "max_score"):
            value = getattr(self, name)
            if value is not None and not 1.0 <= value <= 5.0:
                raise ExportError(f"{name} must be within 1..5, got {value}")
        if (
            self.min_score is not None
            and self.max_score is not None
            and self.min_score > self.max_score
        ):
            raise ExportError("min_score is above max_score")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ExportError("the date range is empty (since >= until)")


@dataclass(frozen=True)
class ExportOptions:
    formats: tuple[str, ...] = FORMATS
    filters: ExportFilters = field(default_factory=ExportFilters)
    scrub: bool = True
    export_id: str | None = None  # default: a new timestamped id
    zip_hf_dataset: bool = True  # one downloadable file for the HF directory
    chunk_size: int = 500  # conversations per database page


@dataclass(frozen=True)
class ExportProgress:
    phase: str  # counting | writing | dataset | done
    conversations: int
    messages: int
    total_messages: int  # estimate: messages of the candidate conversations


@dataclass
class ExportResult:
    export_id: str
    directory: Path
    files: dict[str, Path]  # format -> path ("hf_zip" for the zipped dataset dir)
    conversations: int
    messages: int
    real: int
    synthetic: int
    skipped_opted_out: int
    skipped_empty: int
    scrubbed: ScrubCounts
    scrub_enabled: bool
    salt_source: str  # env | generated
    duration_s: float
    salt: str = field(repr=False, default="")  # never written into the export directory
    user_hashes: frozenset[str] = field(repr=False, default=frozenset())  # private, as salt

    def summary(self) -> dict[str, Any]:
        return {
            "export_id": self.export_id,
            "directory": str(self.directory),
            "files": {k: str(v) for k, v in self.files.items()},
            "conversations": self.conversations,
            "messages": self.messages,
            "real": self.real,
            "synthetic": self.synthetic,
            "skipped_opted_out": self.skipped_opted_out,
            "skipped_empty": self.skipped_empty,
            "scrub_enabled": self.scrub_enabled,
            "scrubbed": self.scrubbed.to_dict(),
            "scrubbed_total": self.scrubbed.total,
            "salt_source": self.salt_source,
            "duration_s": round(self.duration_s, 3),
        }


def iso(value: datetime | None) -> str:
    return value.isoformat() if value is not None else ""
