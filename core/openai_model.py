"""OpenAI-compatible backend (OpenAI, vLLM, Ollama, llama.cpp server, or this app's own /v1)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor

from core.types import (
    BASE_ADAPTER,
    ChatMessage,
    Completion,
    GenerationParams,
    ModelBusyError,
    ModelError,
    ModelTimeoutError,
)

__all__ = ["OpenAIModel"]

log = logging.getLogger(__name__)


class OpenAIModel:
    """A `ChatModel` that talks to any OpenAI-compatible chat completions endpoint.

    The openai client retries 408/409/429/5xx and connection errors with exponential
    backoff, bounded by `max_retries`. A stream that breaks after its first token is not
    retried (the caller already showed part of it); it raises `ModelError`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_retries: int = 4,
        concurrency: int = 8,
        model_id: str | None = None,
    ):
        import openai

        self._openai = openai
        self.model = model
        self.model_id = model_id or model
        self.base_url = base_url
        self.concurrency = max(1, concurrency)
        # Local servers accept any key; the client insists on a non-empty one.
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "not-needed", max_retries=max_retries
        )

    def _kwargs(
        self, messages: Sequence[ChatMessage], params: GenerationParams, adapter: str | None
    ):
        kwargs: dict = {
            "model": adapter if adapter not in (None, BASE_ADAPTER) else self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": params.max_new_tokens,
            "temperature": max(params.temperature, 0.0),
            "top_p": params.top_p,
            "timeout": params.timeout_s,
        }
        if params.seed is not None:
            kwargs["seed"] = params.seed
        return kwargs

    def _translate(self, exc: Exception) -> ModelError:
        openai = self._openai
        if isinstance(exc, openai.APITimeoutError):
            return ModelTimeoutError(f"{self.base_url} timed out")
        if isinstance(exc, openai.RateLimitError):
            return ModelBusyError(f"{self.base_url} is rate limiting (429)")
        if isinstance(exc, openai.APIStatusError):
            return ModelError(f"{self.base_url} answered HTTP {exc.status_code}: {exc.message}")
        if isinstance(exc, openai.APIConnectionError):
            return ModelError(f"cannot reach {self.base_url}: {exc}")
        return ModelError(f"{self.base_url}: {exc}")

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        adapter: str | None = None,
    ) -> Completion:
        started = time.perf_counter()
        try:
            response = self._client.chat.completions.create(
                **self._kwargs(messages, params, adapter)
            )
        except self._openai.OpenAIError as exc:
            raise self._translate(exc) from exc
        except ValueError as exc:  # a body that is not JSON
            raise ModelError(f"{self.base_url} returned a malformed response: {exc}") from exc
        if not getattr(response, "choices", None):
            raise ModelError(f"{self.base_url} returned no choices")
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=(choice.message.content or "").strip(),
            model_id=response.model or self.model_id,
            adapter_id=adapter or BASE_ADAPTER,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_s=time.perf_counter() - started,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
        )

    def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        adapter: str | None = None,
    ) -> Generator[str, None, Completion]:
        started = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        usage = None
        finish = "stop"
        try:
            chunks = self._client.chat.completions.create(
                stream=True,
                stream_options={"include_usage": True},
                **self._kwargs(messages, params, adapter),
            )
            for chunk in chunks:
                if chunk.usage is not None:
                    usage = chunk.usage
                if not chunk.choices:
                    continue
                if chunk.choices[0].finish_reason == "length":
                    finish = "length"
                piece = chunk.choices[0].delta.content
                if piece:
                    if first is None:
                        first = time.perf_counter() - started
                    pieces.append(piece)
                    yield piece
        except self._openai.OpenAIError as exc:
            raise self._translate(exc) from exc
        except ValueError as exc:  # a chunk that is not JSON
            raise ModelError(f"{self.base_url} streamed a malformed chunk: {exc}") from exc
        return Completion(
            text="".join(pieces).strip(),
            model_id=self.model_id,
            adapter_id=adapter or BASE_ADAPTER,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_s=time.perf_counter() - started,
            first_token_s=first,
            finish_reason=finish,  # type: ignore[arg-type]
        )

    def generate_batch(
        self,
        conversations: Sequence[Sequence[ChatMessage]],
        params: GenerationParams,
        adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        if not conversations:
            return []
        per_row = (
            [dataclasses.replace(params, seed=seed) for seed in seeds]
            if seeds is not None
            else [params] * len(conversations)
        )
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            futures = [
                pool.submit(self.generate, c, p, adapter)
                for c, p in zip(conversations, per_row, strict=True)
            ]
            return [f.result() for f in futures]

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        # Rough estimate; remote servers report exact usage per call.
        return sum(len(m.content) for m in messages) // 4 + 4 * len(messages)

    def close(self) -> None:
        self._client.close()
