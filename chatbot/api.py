"""OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/chat/completions`.

The model name picks what serves: "upc" (the active adapter), "base", or an adapter id
that is loaded. Requests need `Authorization: Bearer <key>` with the key from the env var
named by `server.api_key_env`; with no key configured the API refuses every call.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from chatbot.services import Services, context_window
from core.prompting import fit_prompt
from core.settings import Settings
from core.types import (
    BASE_ADAPTER,
    ChatMessage,
    Completion,
    GenerationParams,
    ModelBusyError,
    ModelError,
    ModelTimeoutError,
)
from core.validation import InputError, clean_message

__all__ = ["UPC_MODEL_NAME", "build_api_router"]

log = logging.getLogger(__name__)

UPC_MODEL_NAME = "upc"
_ROLES = {"system", "user", "assistant"}
# Far above any request the limits let through (64 messages of 4,000 characters).
_MAX_BODY_BYTES = 4 * 1024 * 1024
_BUSY_RETRY_AFTER_S = 2  # a reply of the default length takes about this long on a CPU


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    # A busy model is the one refusal a client should simply retry: say when.
    headers = {"Retry-After": str(_BUSY_RETRY_AFTER_S)} if status == 429 else None
    return JSONResponse(
        {"error": {"message": message, "type": kind}}, status_code=status, headers=headers
    )


def _check_key(request: Request, env_name: str) -> None:
    expected = os.environ.get(env_name, "")
    if not expected:
        raise HTTPException(401, f"the API is disabled: set {env_name}")
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "invalid API key")


def build_api_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/v1")
    settings = services.settings

    def check_key(request: Request) -> None:
        _check_key(request, settings.server.api_key_env)

    def model_names() -> list[str]:
        loaded = getattr(services.chatbot_model, "adapters", [])
        return [UPC_MODEL_NAME, BASE_ADAPTER, *loaded]

    def adapter_of(name: str) -> str:
        if name in (UPC_MODEL_NAME, services.chatbot_model.model_id):
            return services.adapters.active
        if name == BASE_ADAPTER:
            return BASE_ADAPTER
        if name in getattr(services.chatbot_model, "adapters", []):
            return name
        raise HTTPException(404, f"unknown model {name!r}; see GET /v1/models")

    @router.get("/models")
    def list_models(request: Request) -> dict:
        check_key(request)
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": now, "owned_by": "upc"}
                for name in model_names()
            ],
        }

    @router.post("/chat/completions")
    async def chat_completions(request: Request):  # type: ignore[no-untyped-def]
        check_key(request)
        raw = await request.body()
        if len(raw) > _MAX_BODY_BYTES:
            return _error(413, f"the body is over {_MAX_BODY_BYTES // 1024 // 1024} MiB")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError
            return _error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        model = services.chatbot_model
        try:
            messages, params = _parse_request(
                body, settings, model.count_tokens, context_window(settings, model)
            )
        except InputError as exc:
            return _error(400, str(exc))
        name = str(body.get("model") or UPC_MODEL_NAME)
        adapter = adapter_of(name)
        created = int(time.time())
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if not body.get("stream"):
            try:
                # Off the event loop: a reply takes seconds, and every other request
                # (chat pages, health checks, the other /v1 callers) waits on the loop.
                result = await run_in_threadpool(model.generate, messages, params, adapter=adapter)
            except ModelBusyError as exc:
                return _error(429, str(exc), "rate_limit_error")
            except ModelTimeoutError as exc:
                return _error(504, str(exc), "timeout")
            except ModelError as exc:
                return _error(500, str(exc), "server_error")
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": "length" if result.finish_reason == "length" else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                },
            }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream = model.stream(messages, params, adapter=adapter)
        try:
            first, final = await run_in_threadpool(_first_piece, stream)
        except ModelBusyError as exc:
            return _error(429, str(exc), "rate_limit_error")
        except ModelError as exc:
            return _error(500, str(exc), "server_error")
        if final is not None:
            stream = iter(())
        return StreamingResponse(
            _sse(stream, first, final, completion_id, created, name, include_usage),
            media_type="text/event-stream",
        )

    return router


def _first_piece(stream: Generator[str, None, Completion]) -> tuple[str, Completion | None]:
    """The stream's first piece, or "" and its result when it has none (run in a thread:
    admission and the prompt's prefill happen here)."""
    try:
        return next(stream), None
    except StopIteration as stop:
        return "", stop.value


def _sse(stream, first, final, completion_id, created, name, include_usage) -> Iterator[str]:  # type: ignore[no-untyped-def]
    def chunk(delta: dict, finish: str | None = None) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(payload)}\n\n"

    yield chunk({"role": "assistant", "content": first})
    try:
        while True:
            try:
                piece = next(stream)
            except StopIteration as stop:
                final = stop.value if stop.value is not None else final
                break
            yield chunk({"content": piece})
    except ModelError as exc:
        error = {"error": {"message": str(exc), "type": "server_error"}}
        yield f"data: {json.dumps(error)}\n\n"
        return
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    finish = "length" if final is not None and final.finish_reason == "length" else "stop"
    yield chunk({}, finish)
    if include_usage and final is not None:
        usage = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [],
            "usage": {
                "prompt_tokens": final.prompt_tokens,
                "completion_tokens": final.completion_tokens,
                "total_tokens": final.prompt_tokens + final.completion_tokens,
            },
        }
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def _parse_request(
    body: dict,
    settings: Settings,
    count_tokens: Callable[[Sequence[ChatMessage]], int],
    context_tokens: int,
) -> tuple[list[ChatMessage], GenerationParams]:
    """The request's messages, cut to the context window, and its sampling parameters."""
    limits = settings.limits
    messages = _parse_messages(
        body.get("messages"), limits.max_message_chars, limits.api_max_messages
    )
    params = _parse_params(body, settings.generation.timeout_s)
    # Oldest turns go first; the system prompt and the last message stay.
    return fit_prompt(messages, count_tokens, context_tokens - params.max_new_tokens), params


def _parse_messages(raw: object, max_chars: int, max_count: int) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise InputError("messages must be a non-empty list")
    if len(raw) > max_count:
        raise InputError(f"at most {max_count} messages per request ({len(raw)} given)")
    messages = []
    for i, item in enumerate(raw):
        role = item.get("role") if isinstance(item, dict) else None
        if not isinstance(role, str) or role not in _ROLES:
            raise InputError(f"messages[{i}] needs a role of system, user or assistant")
        content = item.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        try:
            text = clean_message(content, max_chars)
        except InputError as exc:
            raise InputError(f"messages[{i}]: {exc}") from exc
        messages.append(ChatMessage(role, text))
    return messages


def _parse_params(body: dict, timeout_s: float) -> GenerationParams:
    try:
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 128)
        temperature = float(body.get("temperature", 0.7))
        top_p = float(body.get("top_p", 1.0))
        seed = body.get("seed")
        seed = int(seed) if seed is not None else None
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad sampling parameter: {exc}") from exc
    if not 1 <= max_tokens <= 2048:
        raise InputError("max_tokens must be between 1 and 2048")
    if not 0.0 <= temperature <= 2.0 or not 0.0 < top_p <= 1.0:
        raise InputError("temperature must be in [0, 2] and top_p in (0, 1]")
    return GenerationParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=1.1,
        seed=seed,
        timeout_s=timeout_s,
    )
