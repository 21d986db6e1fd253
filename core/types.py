"""Typed records shared by every model backend."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "BASE_ADAPTER",
    "ChatMessage",
    "ChatModel",
    "Completion",
    "GenerationParams",
    "ModelBusyError",
    "ModelError",
    "ModelTimeoutError",
]

BASE_ADAPTER = "base"

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.15
    seed: int | None = None
    timeout_s: float = 120.0
    # Stop tokens are suppressed until this many tokens exist, so replies are never empty.
    min_new_tokens: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    text: str
    model_id: str
    adapter_id: str = BASE_ADAPTER
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    first_token_s: float | None = None
    finish_reason: Literal["stop", "length", "error", "timeout"] = "stop"
    extra: dict = field(default_factory=dict)


class ModelError(RuntimeError):
    """The model backend failed to produce a reply."""


class ModelBusyError(ModelError):
    """The request queue is full; the caller should retry later."""


class ModelTimeoutError(ModelError):
    """The request ran past its time limit."""


@runtime_checkable
class ChatModel(Protocol):
    """One interface for every backend (local transformers, OpenAI-compatible)."""

    model_id: str

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        adapter: str | None = None,
    ) -> Completion: ...

    def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        adapter: str | None = None,
    ) -> Generator[str, None, Completion]:
        """Yield text pieces and return the final `Completion` (generator return value).

        Raises ModelError/ModelTimeoutError mid-stream on failure."""
        ...

    def generate_batch(
        self,
        conversations: Sequence[Sequence[ChatMessage]],
        params: GenerationParams,
        adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """One completion per conversation; ``seeds`` (one per conversation) override
        ``params.seed``, so a conversation samples the same wherever it sits in a batch."""
        ...

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int: ...

    def close(self) -> None: ...
