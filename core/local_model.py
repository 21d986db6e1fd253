"""Local transformers backend: batched decoding on one worker thread, LoRA adapters via peft.

All model work (forward passes, adapter loads and unloads, exclusive jobs such as the critic's
logit scoring) runs on a single worker thread, so adapters can be swapped safely between
batches while requests stream. Requests that arrive within a short window are decoded
together in one left-padded batch: one forward pass per token for all of them."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.attention import use_grouped_attention
from core.decoding import DecodeRow, PrefixCache, decode_rows
from core.devices import pick_device_and_dtype, worth_quantizing
from core.peft_loading import AdapterLoadError, check_adapter_dir, undo_failed_load
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

__all__ = ["AdapterLoadError", "LocalModel"]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    prompts: list[list[int]]
    params: GenerationParams
    adapter: str | None
    deadline: float
    # One token queue per prompt for streaming; None entries mean "not streamed".
    sinks: list[queue.Queue | None]
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    seeds: list[int] | None = None  # per prompt; else params.seed + row index


@dataclass
class _Exclusive:
    fn: Callable[[Any, Any], Any]
    future: Future = field(default_factory=Future)


_STOP = object()


@dataclass
class _Rows:
    """Per-row state of one decoded batch; a row is one prompt of one job."""

    jobs: list[tuple[_Job, int]]
    prompts: list[list[int]]
    generated: list[list[int]]
    emitted: list[str]  # text already sent to the row's stream
    reasons: list[str]
    first_token_at: list[float | None]

    @classmethod
    def of(cls, batch: list[_Job]) -> _Rows:
        jobs = [(job, i) for job in batch for i in range(len(job.prompts))]
        n = len(jobs)
        return cls(
            jobs=jobs,
            prompts=[job.prompts[i] for job, i in jobs],
            generated=[[] for _ in range(n)],
            emitted=[""] * n,
            reasons=["length"] * n,
            first_token_at=[None] * n,
        )


class LocalModel:
    """A `ChatModel` backed by a local transformers model (HF id or directory)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_id: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        load_in_4bit: bool = True,
        max_batch_size: int = 8,
        queue_size: int = 16,
        batch_window_ms: int = 15,
        prefix_cache_size: int = 8,
        model: Any = None,
        tokenizer: Any = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = str(model_path)
        self.model_id = model_id or self.model_path
        self.device, self.dtype = pick_device_and_dtype(device, dtype)
        self.quantized = False
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        if model is None:
            kwargs: dict[str, Any] = {"dtype": self.dtype}
            if (
                self.device.startswith("cuda")
                and load_in_4bit
                and worth_quantizing(self.model_path)
            ):
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_compute_dtype=torch.bfloat16,
                    bnb_4bit_use_double_quant=True,
                )
                kwargs["device_map"] = {"": self.device}
                self.quantized = True
            model = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs)
            if not self.quantized:
                model.to(self.device)
        model.eval()
        use_grouped_attention(model.get_base_model() if hasattr(model, "get_base_model") else model)
        self.model = model
        # A request's whole window (prompt and reply): prompts are cut to fit it.
        self.context_tokens = int(getattr(model.config, "max_position_embeddings", 0) or 8192)
        self._stop_ids = self._collect_stop_ids()
        self._adapters: dict[str, str] = {}
        self._retiring: set[str] = set()
        self._in_use: dict[str, int] = {}
        self._prefixes = PrefixCache(prefix_cache_size)
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._pending: deque = deque()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="upc-local-model", daemon=True)
        self._worker.start()
        log.info(
            "loaded %s on %s (%s%s)",
            self.model_id,
            self.device,
            self.dtype,
            ", 4-bit NF4" if self.quantized else "",
        )

    # ----------------------------------------------------------------- public API
    def format_prompt(self, messages: Sequence[ChatMessage]) -> str:
        items = [{"role": m.role, "content": m.content} for m in messages]
        return self.tokenizer.apply_chat_template(items, add_generation_prompt=True, tokenize=False)

    def encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = self.format_prompt(messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self.encode(messages))

    def _fitted(self, messages: Sequence[ChatMessage], params: GenerationParams) -> list[int]:
        """The prompt's ids, its oldest turns dropped until it fits the context window."""
        budget = self.context_tokens - params.max_new_tokens
        ids = self.encode(messages)
        if len(ids) <= budget:
            return ids
        return self.encode(fit_prompt(messages, self.count_tokens, budget))

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        adapter: str | None = None,
    ) -> Completion:
        job = self._submit(
            [self._fitted(messages, params)], params, adapter, stream=False, block=False
        )
        return self._wait(job, params)[0]

    def generate_batch(
        self,
        conversations: Sequence[Sequence[ChatMessage]],
        params: GenerationParams,
        adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        if not conversations:
            return []
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError("one seed per conversation")
        prompts = [self._fitted(c, params) for c in conversations]
        job = self._submit(prompts, params, adapter, stream=False, block=True, seeds=seeds)
        return self._wait(job, params)

    def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        adapter: str | None = None,
    ) -> Generator[str, None, Completion]:
        job = self._submit(
            [self._fitted(messages, params)], params, adapter, stream=True, block=False
        )
        sink = job.sinks[0]
        assert sink is not None
        try:
            while True:
                remaining = job.deadline - time.perf_counter() + 5.0
                try:
                    item = sink.get(timeout=max(remaining, 0.1))
                except queue.Empty as exc:
                    job.cancelled.set()
                    raise ModelTimeoutError(f"no reply within {params.timeout_s:.0f}s") from exc
                if item is _STOP:
                    break
                yield item
            completion = job.future.result()[0]
            if completion.finish_reason == "timeout":
                raise ModelTimeoutError(f"the reply ran past {params.timeout_s:.0f}s")
            if completion.finish_reason == "error":
                raise ModelError(completion.extra.get("error", "generation failed"))
            return completion
        finally:
            job.cancelled.set()

    def run_exclusive(self, fn: Callable[[Any, Any], Any], timeout_s: float = 600.0) -> Any:
        """Run `fn(model, tokenizer)` on the worker thread, serialized with generation."""
        task = _Exclusive(fn)
        self._put(task, block=True)
        return task.future.result(timeout=timeout_s)

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def load_adapter(self, adapter_id: str, path: str | Path) -> None:
        """Load a LoRA adapter next to the others (safetensors only); does not activate it.

        All or nothing: if loading fails part-way, the layers it injected are taken out
        again, so the model keeps serving exactly what it served before.
        """
        path = Path(path)
        check_adapter_dir(path)

        def _load(model: Any, _tok: Any) -> None:
            from peft import PeftModel

            if adapter_id in self._adapters:
                return
            first = not hasattr(model, "peft_config")
            try:
                if first:
                    wrapped = PeftModel.from_pretrained(
                        model, str(path), adapter_name=adapter_id, is_trainable=False
                    )
                    wrapped.eval()
                    self.model = wrapped
                else:
                    model.load_adapter(str(path), adapter_name=adapter_id, is_trainable=False)
            except Exception:
                undo_failed_load(model, adapter_id, first=first)
                raise
            self._adapters[adapter_id] = str(path)

        started = time.perf_counter()
        try:
            self.run_exclusive(_load)
        except Exception as exc:  # safetensors, peft and torch each raise their own kinds
            raise AdapterLoadError(f"adapter {adapter_id} could not be loaded: {exc}") from exc
        log.info("adapter %s loaded in %.0f ms", adapter_id, 1000 * (time.perf_counter() - started))

    def unload_adapter(self, adapter_id: str) -> None:
        """Unload once no queued or running request uses it."""
        self._retiring.add(adapter_id)
        self.run_exclusive(lambda _m, _t: self._reap_adapters())

    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._worker.join(timeout=30)

    # ----------------------------------------------------------------- internals
    def _collect_stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (
            self.tokenizer.eos_token_id,
            getattr(self.model.generation_config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list | tuple):
                ids.update(int(i) for i in source)
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|im_start|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return ids

    def _submit(
        self,
        prompts: list[list[int]],
        params: GenerationParams,
        adapter: str | None,
        *,
        stream: bool,
        block: bool,
        seeds: Sequence[int] | None = None,
    ) -> _Job:
        if self._closed:
            raise ModelError("the model is shut down")
        adapter = None if adapter in (None, BASE_ADAPTER) else adapter
        if adapter is not None and adapter not in self._adapters:
            raise ModelError(f"adapter {adapter!r} is not loaded")
        job = _Job(
            prompts=prompts,
            params=params,
            adapter=adapter,
            deadline=time.perf_counter() + params.timeout_s,
            sinks=[queue.Queue() if stream else None for _ in prompts],
            seeds=None if seeds is None else list(seeds),
        )
        if adapter is not None:
            self._in_use[adapter] = self._in_use.get(adapter, 0) + 1
        try:
            self._put(job, block=block)
        except ModelBusyError:
            self._release(job)
            raise
        return job

    def _put(self, item: Any, *, block: bool) -> None:
        try:
            if block:
                self._queue.put(item, timeout=600)
            else:
                self._queue.put_nowait(item)
        except queue.Full as exc:
            raise ModelBusyError(
                "the model is busy (request queue full); please try again in a moment"
            ) from exc

    def _wait(self, job: _Job, params: GenerationParams) -> list[Completion]:
        try:
            completions = job.future.result(timeout=params.timeout_s + 30)
        except TimeoutError as exc:
            job.cancelled.set()
            raise ModelTimeoutError(f"no reply within {params.timeout_s:.0f}s") from exc
        for completion in completions:
            if completion.finish_reason == "error":
                raise ModelError(completion.extra.get("error", "generation failed"))
        if all(c.finish_reason == "timeout" for c in completions):
            raise ModelTimeoutError(f"the reply ran past {params.timeout_s:.0f}s")
        return completions

    def _release(self, job: _Job) -> None:
        if job.adapter is not None:
            self._in_use[job.adapter] -= 1

    def _reap_adapters(self) -> None:
        for adapter_id in list(self._retiring):
            if self._in_use.get(adapter_id, 0) > 0:
                continue
            self._prefixes.drop_adapter(adapter_id)
            if adapter_id in self._adapters and hasattr(self.model, "delete_adapter"):
                self.model.delete_adapter(adapter_id)
                del self._adapters[adapter_id]
                log.info("adapter %s unloaded", adapter_id)
            self._retiring.discard(adapter_id)

    def _next_item(self, block: bool) -> Any:
        if self._pending:
            return self._pending.popleft()
        if block:
            return self._queue.get()
        return self._queue.get_nowait()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            item = self._next_item(block=True)
            if item is _STOP:
                return
            if isinstance(item, _Exclusive):
                self._run_exclusive(item)
                continue
            batch = [item]
            self._gather(batch)
            try:
                self._decode(batch)
            except Exception as exc:
                log.exception("generation failed")
                for job in batch:
                    self._fail(job, exc)
            finally:
                for job in batch:
                    self._release(job)
                if self._retiring:
                    self._reap_adapters()

    def _run_exclusive(self, task: _Exclusive) -> None:
        try:
            task.future.set_result(task.fn(self.model, self.tokenizer))
        except Exception as exc:
            task.future.set_exception(exc)

    def _gather(self, batch: list[_Job]) -> None:
        """Collect compatible chat jobs arriving within the batch window."""
        first = batch[0]
        if len(first.prompts) >= self.max_batch_size:
            return
        deadline = time.perf_counter() + self.batch_window_s
        size = len(first.prompts)
        skipped: list[Any] = []
        while size < self.max_batch_size:
            if self._pending:
                item = self._pending.popleft()
            else:
                timeout = deadline - time.perf_counter()
                try:
                    if timeout > 0:
                        item = self._queue.get(timeout=timeout)
                    else:
                        item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if (
                isinstance(item, _Job)
                and (item.adapter == first.adapter or self._mixable)
                and size + len(item.prompts) <= self.max_batch_size
            ):
                batch.append(item)
                size += len(item.prompts)
            else:
                skipped.append(item)
                if item is _STOP or isinstance(item, _Exclusive):
                    break
        self._pending.extendleft(reversed(skipped))

    def _fail(self, job: _Job, exc: BaseException) -> None:
        for sink in job.sinks:
            if sink is not None:
                sink.put(_STOP)
        if not job.future.done():
            job.future.set_result(
                [
                    Completion(
                        text="",
                        model_id=self.model_id,
                        finish_reason="error",
                        adapter_id=job.adapter or BASE_ADAPTER,
                        extra={"error": str(exc)},
                    )
                    for _ in job.prompts
                ]
            )

    @property
    def _mixable(self) -> bool:
        """Whether jobs under different adapters can share a decode batch: any peft model
        (the base runs as peft's "__base__" rows)."""
        return hasattr(self.model, "peft_config")

    def _adapter_context(self, adapter: str | None, mixed: bool = False) -> Any:
        from contextlib import nullcontext

        model = self.model
        if mixed or not hasattr(model, "peft_config"):
            return nullcontext()
        if adapter is None:
            return model.disable_adapter()
        model.set_adapter(adapter)
        return nullcontext()

    def _decode(self, batch: list[_Job]) -> None:
        rows = _Rows.of(batch)
        prompts, n = rows.prompts, len(rows.jobs)
        started = time.perf_counter()
        specs = [
            DecodeRow(
                prompt=job.prompts[idx],
                max_new_tokens=job.params.max_new_tokens,
                min_new_tokens=job.params.min_new_tokens,
                temperature=job.params.temperature,
                top_p=job.params.top_p,
                repetition_penalty=job.params.repetition_penalty or 1.0,
                # Rows of one job get distinct seeds, so a seeded batch does not repeat itself.
                seed=job.seeds[idx] if job.seeds else _row_seed(job.params.seed, idx),
                streamed=job.sinks[idx] is not None,
                adapter=job.adapter,
            )
            for job, idx in rows.jobs
        ]
        adapter = batch[0].adapter
        # Jobs under different adapters share the batch (peft's mixed-batch LoRA).
        mixed = len({job.adapter for job in batch}) > 1
        cache, reused = self._prefixes.take(prompts, None if mixed else adapter)
        with torch.inference_mode(), self._adapter_context(None if mixed else adapter, mixed):
            decoded = decode_rows(
                self.model,
                specs,
                pad_id=self.tokenizer.pad_token_id,
                stop_ids=sorted(self._stop_ids),
                device=self.device,
                cache=cache,
                reused=reused,
                check=lambda live: self._check(rows, live),
                on_token=lambda r, token: self._stream(rows, r, token),
                started=started,
                mixed_adapters=mixed,
            )
        elapsed = time.perf_counter() - started
        for r, result in enumerate(decoded):
            job = rows.jobs[r][0]
            rows.generated[r] = result.tokens
            rows.reasons[r] = result.reason
            first = result.first_token_s
            rows.first_token_at[r] = None if first is None else first + started - job.submitted_at
        if n == 1:
            fed = (prompts[0] + decoded[0].tokens)[: cache.get_seq_length()]
            self._prefixes.store(fed, cache, adapter)
        extra = {"batch_size": n, "decode_s": elapsed, "cached_prompt_tokens": reused}
        self._deliver(batch, rows, extra)

    @staticmethod
    def _check(rows: _Rows, live: list[int]) -> list[str | None]:
        """Host checks at a sync point: a cancelled row stops, a late one times out."""
        now = time.perf_counter()
        out: list[str | None] = []
        for r in live:
            job = rows.jobs[r][0]
            out.append(
                "stop" if job.cancelled.is_set() else "timeout" if now > job.deadline else None
            )
        return out

    def _stream(self, rows: _Rows, r: int, token: int) -> None:
        """Send a streamed row's new text once it decodes to whole characters."""
        job, idx = rows.jobs[r]
        sink = job.sinks[idx]
        rows.generated[r].append(token)
        text = self.tokenizer.decode(rows.generated[r], skip_special_tokens=True)
        if sink is not None and not text.endswith("\ufffd") and len(text) > len(rows.emitted[r]):
            sink.put(text[len(rows.emitted[r]) :])
            rows.emitted[r] = text

    def _deliver(self, batch: list[_Job], rows: _Rows, extra: dict[str, Any]) -> None:
        """Flush each stream's last text, then resolve every job with its completions."""
        results: dict[int, list[Completion]] = {id(job): [] for job in batch}
        for r, (job, idx) in enumerate(rows.jobs):
            generated = rows.generated[r]
            text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
            sink = job.sinks[idx]
            if sink is not None:
                full = self.tokenizer.decode(generated, skip_special_tokens=True)
                if len(full) > len(rows.emitted[r]):
                    sink.put(full[len(rows.emitted[r]) :])
                sink.put(_STOP)
            results[id(job)].append(
                Completion(
                    text=text,
                    model_id=self.model_id,
                    adapter_id=job.adapter or BASE_ADAPTER,
                    prompt_tokens=len(rows.prompts[r]),
                    completion_tokens=len(generated),
                    latency_s=time.perf_counter() - job.submitted_at,
                    first_token_s=rows.first_token_at[r],
                    finish_reason=rows.reasons[r],  # type: ignore[arg-type]
                    extra=dict(extra),
                )
            )
        for job in batch:
            job.future.set_result(results[id(job)])


def _row_seed(seed: int | None, index: int) -> int:
    """A row's sampling seed: the request's seed plus the row index, else a fresh random one."""
    return secrets.randbits(62) if seed is None else seed + index
