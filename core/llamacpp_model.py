"""The llama.cpp backend: a GGUF served by llama.cpp's own server, behind `ChatModel`.

llama.cpp does the serving work: its parallel slots decode several requests in one batch
per step (continuous batching), and each slot keeps the KV cache of its last prompt, so the
next turn of a conversation only prefills what is new. This class adds what the app needs
around it, the same as the torch backend: a bounded queue with a clear busy error, per-request
deadlines, cancellation when the reader goes away (closing the HTTP stream stops the slot),
prompts fitted to the context window, and LoRA adapters picked per request.

Adapters: the wheel loads LoRA files only when a server starts, so loading a new one starts
a second server with the new set, switches requests to it once it answers, and closes the
old one when its last request is done (`core.llamacpp_swap`). Every request names the scale
of every loaded adapter (1 for its own, 0 for the rest), so one server serves them all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from core.gguf_files import GgufError, check_lora, read_model
from core.gguf_lora import GgufLoraError, write_gguf_lora
from core.llamacpp_swap import Instance, ServerPool
from core.peft_loading import AdapterLoadError
from core.prompting import fit_prompt
from core.types import (
    BASE_ADAPTER,
    ChatMessage,
    Completion,
    GenerationParams,
    ModelBusyError,
    ModelError,
    ModelTimeoutError,
)

__all__ = ["LlamaCppModel", "listed_lora_file"]

log = logging.getLogger(__name__)

BUSY_MESSAGE = "the model is busy (request queue full); please try again in a moment"
# The GGUF LoRA the registry writes next to an adapter's safetensors and lists in its manifest.
LORA_FILE = "adapter_model.gguf"


def listed_lora_file(adapter_dir: Path) -> Path | None:
    """The adapter's GGUF LoRA if its manifest lists it (so the caller's hash check covered
    it); an unlisted one (a crash mid-conversion) is never served."""
    try:
        manifest = json.loads((adapter_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    listed = isinstance(files, dict) and LORA_FILE in files
    return adapter_dir / LORA_FILE if listed and (adapter_dir / LORA_FILE).is_file() else None


class LlamaCppModel:
    """A `ChatModel` serving a GGUF through llama.cpp server processes."""

    def __init__(
        self,
        gguf_path: str | Path,
        *,
        model_id: str | None = None,
        n_parallel: int = 4,
        ctx_tokens: int = 4096,
        threads: int = 0,
        queue_size: int = 16,
        cache_ram_mib: int = 256,
        start_timeout_s: float = 120.0,
    ):
        try:
            self.info = read_model(gguf_path)
        except GgufError as exc:
            raise ModelError(f"cannot serve {gguf_path}: {exc}") from exc
        self.gguf_path = Path(gguf_path)
        self.model_id = model_id or self.gguf_path.name
        trained = self.info.context_length or ctx_tokens
        # A request's whole window (prompt and reply): one llama.cpp slot.
        self.context_tokens = min(ctx_tokens, trained)
        self.n_parallel = n_parallel
        self.queue_size = queue_size
        self._slots = threading.BoundedSemaphore(n_parallel + queue_size)
        self._admitted = 0
        self._count_lock = threading.Lock()
        self._adapters: dict[str, Path] = {}
        # Held ahead of use (`prepare_adapters`): kept in every server start.
        self._prepared: dict[str, Path] = {}
        self._adapter_lock = threading.Lock()  # one change of the adapter set at a time
        self._closed = False
        self._pool = ServerPool(
            str(self.gguf_path),
            ctx_tokens=self.context_tokens,
            n_parallel=n_parallel,
            threads=threads,
            cache_ram_mib=cache_ram_mib,
            http_threads=n_parallel + queue_size + 4,
            start_timeout_s=start_timeout_s,
        )
        try:
            self._pool.start({})
        except BaseException:
            self._pool.close()
            raise
        self._converted = Path(tempfile.mkdtemp(prefix="upc-gguf-lora-"))
        log.info(
            "llama.cpp serving %s (%d slots of %d tokens) in %.1fs",
            self.gguf_path.name,
            n_parallel,
            self.context_tokens,
            self._pool.last_start_s,
        )

    # ----------------------------------------------------------------- public API
    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    @property
    def server_pid(self) -> int:
        """The process id of the llama.cpp server taking new requests."""
        return self._pool.current_pid()

    @property
    def last_swap_s(self) -> float:
        """Seconds the last server start took (model, adapters, first answer)."""
        return self._pool.last_start_s

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        adapter: str | None = None,
    ) -> Completion:
        return _drain(self._request(messages, params, adapter, block=False))

    def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        adapter: str | None = None,
    ) -> Generator[str, None, Completion]:
        return self._request(messages, params, adapter, block=False)

    def generate_batch(
        self,
        conversations: Sequence[Sequence[ChatMessage]],
        params: GenerationParams,
        adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """All rows at once: llama.cpp decodes up to `n_parallel` of them in one batch."""
        if not conversations:
            return []
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError("one seed per conversation")
        if seeds is None:
            seeds = [_row_seed(params.seed, i) for i in range(len(conversations))]
        rows = [dataclasses.replace(params, seed=seed) for seed in seeds]
        workers = min(len(conversations), self.n_parallel + self.queue_size)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upc-llamacpp") as pool:
            futures = [
                pool.submit(_drain, self._request(c, p, adapter, block=True))
                for c, p in zip(conversations, rows, strict=True)
            ]
            return [f.result() for f in futures]

    def format_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text llama.cpp builds from the messages (the GGUF's chat template)."""
        instance = self._pool.take()
        try:
            return self._apply_template(instance, messages)
        finally:
            self._pool.release(instance)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        instance = self._pool.take()
        try:
            return self._count(instance, messages)
        finally:
            self._pool.release(instance)

    def load_adapter(self, adapter_id: str, path: str | Path) -> None:
        """Serve one more adapter: a new server with it starts, then takes the requests.

        `path` is a GGUF LoRA or a verified adapter directory. All or nothing: if
        the file doesn't fit the model or the server doesn't start, the running server
        keeps serving what it served and AdapterLoadError says why.
        """
        with self._adapter_lock:
            if adapter_id in self._adapters:
                return
            held = self._pool.held().get(adapter_id)
            if held is not None:  # prepared, or unloaded since the last start: no restart
                self._adapters = {**self._adapters, adapter_id: held}
                log.info("adapter %s served by llama.cpp (already held)", adapter_id)
                return
            lora = self._checked_lora(adapter_id, Path(path))
            wanted = {**self._prepared, **self._adapters, adapter_id: lora}
            try:
                self._pool.start(wanted)
            except ModelError as exc:
                raise AdapterLoadError(f"adapter {adapter_id} could not be loaded: {exc}") from exc
            self._adapters = {**self._adapters, adapter_id: lora}
        log.info("adapter %s served by llama.cpp (start %.2fs)", adapter_id, self.last_swap_s)

    def prepare_adapters(self, adapters: Mapping[str, str | Path]) -> list[str]:
        """Hold these adapters' LoRAs in the serving server before anyone asks for them,
        so `load_adapter` of one later needs no server start (activation in well under a
        second instead of a model load). Starts a new server, as a swap does, only when
        the held set changes. An adapter that doesn't fit the model is skipped with a
        warning (loading it later fails as usual); returns the ids now held."""
        with self._adapter_lock:
            files: dict[str, Path] = {}
            for adapter_id, path in adapters.items():
                if adapter_id in self._adapters:
                    continue
                try:
                    files[adapter_id] = self._checked_lora(adapter_id, Path(path))
                except AdapterLoadError as exc:
                    log.warning("not preparing %s: %s", adapter_id, exc)
            wanted = {**files, **self._adapters}
            if set(wanted) - set(self._pool.held()):
                self._pool.start(wanted)
                log.info("llama.cpp now holds %s (start %.2fs)", sorted(wanted), self.last_swap_s)
            self._prepared = files
            return sorted(self._pool.held())

    def _checked_lora(self, adapter_id: str, path: Path) -> Path:
        try:
            lora = self._lora_file(adapter_id, path)
            check_lora(lora, self.info)
        except (GgufError, GgufLoraError) as exc:
            raise AdapterLoadError(f"adapter {adapter_id} could not be loaded: {exc}") from exc
        return lora

    def _lora_file(self, adapter_id: str, path: Path) -> Path:
        """A GGUF file as given; an adapter directory's listed GGUF LoRA, else one converted
        now from its safetensors (kept with this model, removed at close)."""
        if path.is_file():
            return path
        listed = listed_lora_file(path)
        if listed is not None:
            return listed
        out = self._converted / f"{adapter_id}-{uuid.uuid4().hex[:8]}.gguf"
        write_gguf_lora(path, out, base_config=self.gguf_path)
        log.info("adapter %s: converted to a GGUF LoRA for llama.cpp", adapter_id)
        return out

    def unload_adapter(self, adapter_id: str) -> None:
        """Stop offering the adapter; the next server start leaves it out.

        The running server keeps its weights, so a request already routed to it still
        gets its reply.
        """
        with self._adapter_lock:
            self._adapters = {k: v for k, v in self._adapters.items() if k != adapter_id}

    def busy_slots(self) -> int:
        """Slots of the serving llama.cpp server decoding or prefilling right now."""
        instance = self._pool.take()
        try:
            response = instance.client.get("/slots", timeout=10.0)
        except httpx.HTTPError as exc:
            raise ModelError(f"the llama.cpp server failed: {exc}") from exc
        finally:
            self._pool.release(instance)
        return sum(1 for slot in response.json() if slot.get("is_processing"))

    def queue_depth(self) -> int:
        """Requests waiting for a slot (admitted, not yet decoding)."""
        return max(0, self._admitted - self.n_parallel)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        shutil.rmtree(self._converted, ignore_errors=True)

    # ----------------------------------------------------------------- internals
    def _admit(self, block: bool) -> None:
        """Take a place among the admitted requests: slots plus the queue, else busy."""
        if self._closed:
            raise ModelError("the model is shut down")
        if not self._slots.acquire(blocking=block, timeout=600 if block else None):
            raise ModelBusyError(BUSY_MESSAGE)
        with self._count_lock:
            self._admitted += 1

    def _leave(self) -> None:
        with self._count_lock:
            self._admitted -= 1
        self._slots.release()

    def _request(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        adapter: str | None,
        *,
        block: bool,
    ) -> Generator[str, None, Completion]:
        """One request, from admission to the last piece. Nothing is held until the first
        `next()`, so a stream that is never read holds no slot."""
        adapter = None if adapter in (None, BASE_ADAPTER) else adapter
        started = time.perf_counter()
        self._admit(block)
        try:
            instance = self._pool.take()
            try:
                # Any adapter the server holds still serves (one just unloaded included):
                # a request routed to it a moment before a swap gets its reply.
                if adapter is not None and adapter not in instance.loras:
                    raise ModelError(f"adapter {adapter!r} is not loaded")
                budget = self.context_tokens - params.max_new_tokens
                fitted = fit_prompt(messages, lambda m: self._count(instance, m), budget)
                body = _body(fitted, params, instance.loras, adapter)
                completion = yield from self._post(instance, body, params.timeout_s, started)
            finally:
                self._pool.release(instance)
        finally:
            self._leave()
        return dataclasses.replace(
            completion,
            model_id=self.model_id,
            adapter_id=adapter or BASE_ADAPTER,
            latency_s=time.perf_counter() - started,
        )

    def _post(
        self, instance: Instance, body: dict, timeout_s: float, started: float
    ) -> Generator[str, None, Completion]:
        """Stream the reply; leaving early (closed by the reader, a deadline, an error)
        closes the connection, and llama.cpp then stops decoding that slot."""
        deadline = started + timeout_s
        remaining = max(deadline - time.perf_counter(), 0.1)
        timeout = httpx.Timeout(10.0, read=remaining, pool=remaining)
        pieces: list[str] = []
        first: float | None = None
        final: dict[str, Any] = {}
        try:
            with instance.client.stream(
                "POST", "/v1/chat/completions", json=body, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    raise _http_error(response.status_code, response.read())
                for chunk in _events(response.iter_lines()):
                    if time.perf_counter() > deadline:
                        raise ModelTimeoutError(f"the reply ran past {timeout_s:.0f}s")
                    piece = _absorb(chunk, final)
                    if piece:
                        first = first if first is not None else time.perf_counter() - started
                        pieces.append(piece)
                        yield piece
        except httpx.TimeoutException as exc:
            raise ModelTimeoutError(f"no reply within {timeout_s:.0f}s") from exc
        except httpx.HTTPError as exc:
            self._pool.report_failure(instance)
            raise ModelError(f"the llama.cpp server failed: {exc}") from exc
        return _completion("".join(pieces), final, first)

    def _apply_template(self, instance: Instance, messages: Sequence[ChatMessage]) -> str:
        data = _call(instance, "/apply-template", {"messages": _wire(messages)})
        return str(data["prompt"])

    def _count(self, instance: Instance, messages: Sequence[ChatMessage]) -> int:
        prompt = self._apply_template(instance, messages)
        data = _call(instance, "/tokenize", {"content": prompt, "add_special": True})
        return len(data["tokens"])


def _call(instance: Instance, path: str, body: dict) -> dict:
    try:
        response = instance.client.post(path, json=body, timeout=30.0)
    except httpx.HTTPError as exc:
        raise ModelError(f"the llama.cpp server failed: {exc}") from exc
    if response.status_code != 200:
        raise _http_error(response.status_code, response.content)
    return response.json()


def _wire(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _body(
    messages: Sequence[ChatMessage],
    params: GenerationParams,
    loras: dict[str, int],
    adapter: str | None,
) -> dict:
    """The request: the torch path's sampling (no top-k or min-p), every adapter's scale."""
    body: dict[str, Any] = {
        "messages": _wire(messages),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_new_tokens,
        "temperature": max(params.temperature, 0.0),
        "top_p": params.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": params.repetition_penalty or 1.0,
        "cache_prompt": True,
        # A fixed length (benchmarks) runs to max_tokens past any end-of-turn.
        "ignore_eos": params.min_new_tokens >= params.max_new_tokens,
        "lora": [{"id": i, "scale": 1.0 if name == adapter else 0.0} for name, i in loras.items()],
    }
    if params.seed is not None:
        body["seed"] = params.seed % (2**32 - 1)
    return body


def _events(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError as exc:
            raise ModelError(f"llama.cpp streamed a malformed chunk: {exc}") from exc


def _absorb(chunk: dict, final: dict[str, Any]) -> str:
    """The chunk's text; its finish reason, usage and timings go into `final`."""
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise ModelError(f"llama.cpp failed mid-reply: {message}")
    if chunk.get("usage"):
        final["usage"] = chunk["usage"]
    if chunk.get("timings"):
        final["timings"] = chunk["timings"]
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if choices[0].get("finish_reason"):
        final["finish"] = choices[0]["finish_reason"]
    return (choices[0].get("delta") or {}).get("content") or ""


def _completion(text: str, final: dict[str, Any], first: float | None) -> Completion:
    usage = final.get("usage") or {}
    timings = final.get("timings") or {}
    return Completion(
        text=text.strip(),
        model_id="",
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        first_token_s=first,
        finish_reason="length" if final.get("finish") == "length" else "stop",
        extra={
            "cached_prompt_tokens": int(timings.get("cache_n", 0)),
            "prompt_ms": float(timings.get("prompt_ms", 0.0)),
            "decode_tokens_per_s": float(timings.get("predicted_per_second", 0.0)),
        },
    )


def _http_error(status: int, content: bytes) -> ModelError:
    try:
        error = json.loads(content).get("error", {})
        message = error.get("message", "") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = content[:200].decode("utf-8", "replace")
    if status == 503:
        return ModelBusyError(f"the llama.cpp server is busy: {message}")
    return ModelError(f"llama.cpp answered HTTP {status}: {message}")


def _drain(stream: Generator[str, None, Completion]) -> Completion:
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            return stop.value


def _row_seed(seed: int | None, index: int) -> int | None:
    """Rows of one batch sample apart: the request's seed plus the row index."""
    return None if seed is None else seed + index
