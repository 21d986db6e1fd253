"""The batched decode loop of the local backend, and its prefix KV cache.

Everything per token stays on the device: sampling (repetition penalty, temperature, top-p
and a counter-based Gumbel draw), end-of-turn detection and the token buffer. The host looks
at the batch only every few steps (stops, cancellations, deadlines), or every step when a row
streams. Finished rows leave the batch once a quarter of it is done, and rows that share a
prompt (best-of-n samples) prefill it once.

Sampling noise is a hash of (row seed, step, token id), so a row's tokens depend on its seed
and its logits, not on which other rows share the batch: the same seeds give the same corpus
whether users are decoded together, apart, or on different GPUs.

The prefix cache lets a chat turn re-use its previous turn's keys and values.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DecodeResult",
    "DecodeRow",
    "PrefixCache",
    "decode_rows",
    "sample_tokens",
    "uniform_noise",
]

MIN_REUSE = 8  # shorter shared prefixes are not worth a cache lookup


def common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    i = 0
    while i < limit and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Recent single-request KV caches, keyed by insertion, each tied to its adapter.

    Not thread-safe: the model's worker thread owns it.
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[int, tuple[list[int], Any, str | None]] = OrderedDict()
        self._counter = 0

    def take(self, prompts: list[list[int]], adapter: str | None) -> tuple[Any, int]:
        """A KV cache holding the longest cached prefix of a single prompt, and its length.

        Chat turns extend the previous turn's prompt and reply, so the next request from the
        same conversation usually re-uses almost all of its prompt's keys and values.
        """
        from transformers import DynamicCache

        if len(prompts) != 1 or not self._entries:
            return DynamicCache(), 0
        prompt = prompts[0]
        best_key, best_len = None, 0
        for key, (tokens, _cache, owner) in self._entries.items():
            if owner != adapter:
                continue
            length = common_prefix(tokens, prompt)
            if length > best_len:
                best_key, best_len = key, length
        # At least one prompt token is left to run, for the next token's logits.
        usable = min(best_len, len(prompt) - 1)
        if best_key is None or usable < MIN_REUSE:
            return DynamicCache(), 0
        _tokens, cache, _owner = self._entries.pop(best_key)
        excess = cache.get_seq_length() - usable
        if excess > 0:
            cache.crop(-excess)
        return cache, usable

    def store(self, tokens: list[int], cache: Any, adapter: str | None) -> None:
        if self.size <= 0 or len(tokens) < MIN_REUSE:
            return
        self._counter += 1
        self._entries[self._counter] = (tokens, cache, adapter)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop_adapter(self, adapter_id: str) -> None:
        for key in [k for k, v in self._entries.items() if v[2] == adapter_id]:
            del self._entries[key]


SYNC_EVERY = 8  # host checks every 8 steps when nothing streams
COMPACT_AT = 0.25  # drop finished rows once a quarter of the batch is done
_MIN_COMPACT_ROWS = 16
NUCLEUS_CANDIDATES = 512  # top-p is applied within the 512 likeliest tokens
_M32 = 0xFFFFFFFF


@dataclass
class DecodeRow:
    prompt: list[int]
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int
    streamed: bool = False
    # Mixed-adapter batches only (``decode_rows(..., mixed_adapters=True)``): this row's
    # LoRA adapter, None for the base model.
    adapter: str | None = None


# peft's name for "no adapter" in a mixed batch (`adapter_names=`).
PEFT_BASE = "__base__"


def _adapter_names(rows: Sequence[DecodeRow]) -> list[str]:
    return [r.adapter or PEFT_BASE for r in rows]


@dataclass
class DecodeResult:
    tokens: list[int]
    reason: str  # "stop", "length", or a reason given by the host check
    first_token_s: float | None


# Host callbacks: ``check(rows)`` gets the live global row indices at a sync point and
# returns a reason to end each one (or None); ``on_token(row, token)`` sees streamed tokens.
Check = Callable[[list[int]], list[str | None]]
OnToken = Callable[[int, int], None]


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values below 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, step: int, ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) draws, one per (row seed, step, token id); ``ids`` is (rows, k)."""
    row = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ (step & _M32)))
    x = _mix32(row[:, None] ^ _mix32(ids.long() & _M32))
    return ((x >> 8).float() + 0.5) / float(1 << 24)


def sample_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor,
    penalty: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    step: int,
    any_sampled: bool = True,
) -> torch.Tensor:
    """One next token per row: repetition penalty, then greedy or temperature + top-p."""
    pen = penalty[:, None]
    penalised = torch.where(logits > 0, logits / pen, logits * pen)
    logits = torch.where(seen, penalised, logits)
    greedy = torch.argmax(logits, dim=-1)
    if not any_sampled:
        return greedy
    k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    top_logits, top_ids = torch.topk(logits, k, dim=-1)
    logp = torch.log_softmax(top_logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    probs = logp.exp()
    keep = (probs.cumsum(dim=-1) - probs) < top_p[:, None]
    keep[:, 0] = True
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, step, top_ids)))
    pick = torch.where(keep, logp + gumbel, float("-inf")).argmax(dim=-1, keepdim=True)
    sampled = top_ids.gather(1, pick).squeeze(1)
    return torch.where(temperature > 0, sampled, greedy)


def _left_pad(prompts: Sequence[list[int]], width: int, pad_id: int) -> tuple[Any, Any]:
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids, mask


class _Batch:
    """Per-row decode state on the device; rows can be dropped as they finish."""

    def __init__(self, rows: Sequence[DecodeRow], device: str, vocab: int):
        self.ids = torch.arange(len(rows), device=device)
        self.penalty = torch.tensor([r.repetition_penalty or 1.0 for r in rows], device=device)
        self.temperature = torch.tensor([r.temperature for r in rows], device=device)
        self.top_p = torch.tensor([r.top_p for r in rows], device=device)
        self.seeds = torch.tensor([r.seed for r in rows], dtype=torch.long, device=device)
        self.min_new = torch.tensor([r.min_new_tokens for r in rows], device=device)
        self.max_new = torch.tensor([r.max_new_tokens for r in rows], device=device)
        self.lengths = torch.zeros(len(rows), dtype=torch.long, device=device)
        self.done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        self.stopped = torch.zeros(len(rows), dtype=torch.bool, device=device)
        # The repetition penalty covers generated tokens only: penalising the prompt would
        # also penalise the end-of-turn token and keep replies running to the cap.
        self.seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=device)

    def select(self, keep: torch.Tensor) -> None:
        for name in (
            "ids", "penalty", "temperature", "top_p", "seeds", "min_new", "max_new",
            "lengths", "done", "stopped", "seen",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name)[keep])


def _prefill(
    model: Any,
    rows: Sequence[DecodeRow],
    pad_id: int,
    device: str,
    cache: Any,
    reused: int,
    mixed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Run the prompts once; rows sharing a prompt (best-of-n) and an adapter share its
    prefill, and the cache is then spread to every row. Returns the last logits, the prompt
    mask, the last positions and the padded width."""
    n = len(rows)
    unique: dict[tuple[str | None, tuple[int, ...]], int] = {}
    owner = [unique.setdefault((r.adapter, tuple(r.prompt)), len(unique)) for r in rows]
    prompts = [list(p) for _adapter, p in unique]
    extra = {"adapter_names": [a or PEFT_BASE for a, _p in unique]} if mixed else {}
    width = max(len(p) for p in prompts)
    input_ids, mask = _left_pad(prompts, width, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if reused:
        input_ids, positions_in = input_ids[:, reused:], positions[:, reused:]
    else:
        positions_in = positions
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions_in,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **extra,
    )
    logits = out.logits[:, -1, :].float()
    position = positions[:, -1:]
    if len(prompts) < n:
        index = torch.tensor(owner, device=device)
        cache.batch_select_indices(index)
        logits, mask, position = logits[index], mask[index], position[index]
    return logits, mask, position, width


def _stop_mask(stop_ids: Sequence[int], vocab: int, device: str) -> torch.Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)] = True
    return mask


def _stream(
    on_token: OnToken,
    rows: Sequence[DecodeRow],
    live: Sequence[int],
    nxt: torch.Tensor,
    grows: torch.Tensor,
) -> None:
    """Hand each streamed row's new token (if it grew) to ``on_token``."""
    host, alive = nxt.tolist(), grows.tolist()
    for k, r in enumerate(live):
        if rows[r].streamed and alive[k]:
            on_token(r, host[k])


def _mark_first_tokens(first_token: list[float | None], live: Sequence[int], now: float) -> None:
    for r in live:
        if first_token[r] is None:
            first_token[r] = now


def decode_rows(
    model: Any,
    rows: Sequence[DecodeRow],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    device: str,
    cache: Any,
    reused: int = 0,
    check: Check | None = None,
    on_token: OnToken | None = None,
    started: float | None = None,
    mixed_adapters: bool = False,
) -> list[DecodeResult]:
    """Decode ``rows`` together; ``cache`` may hold the first ``reused`` prompt tokens
    (single-row requests only). With ``mixed_adapters`` each row runs under its own
    ``adapter`` (peft's mixed-batch LoRA: ``model`` is a PeftModel in eval mode); otherwise
    the caller has set the one adapter. Returns one result per row, in order."""
    n = len(rows)
    started = time.perf_counter() if started is None else started
    streaming = any(r.streamed for r in rows)
    sync_every = 1 if streaming or n == 1 else SYNC_EVERY
    max_new = max(r.max_new_tokens for r in rows)
    vocab = model.get_output_embeddings().weight.shape[0]
    stop_mask = _stop_mask(stop_ids, vocab, device)
    any_sampled = any(r.temperature > 0 for r in rows)
    any_min = any(r.min_new_tokens > 0 for r in rows)

    logits, mask, position, width = _prefill(
        model, rows, pad_id, device, cache, reused, mixed_adapters
    )
    names = _adapter_names(rows) if mixed_adapters else None
    attention = torch.zeros((n, width + max_new), dtype=torch.long, device=device)
    attention[:, :width] = mask

    state = _Batch(rows, device, vocab)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    tokens = torch.full((n, max_new), pad_id, dtype=torch.long, device=device)
    reasons: list[str | None] = [None] * n
    first_token: list[float | None] = [None] * n
    streamed = [r for r in range(n) if rows[r].streamed]
    live = list(range(n))
    for step in range(max_new):
        if any_min:
            short = (state.lengths < state.min_new)[:, None] & stop_mask[None, :]
            logits = logits.masked_fill(short, float("-inf"))
        nxt = sample_tokens(
            logits, state.seen, state.penalty, state.temperature, state.top_p,
            state.seeds, step, any_sampled,
        )  # fmt: skip
        is_stop = stop_mask[nxt] & ~state.done
        grows = ~state.done & ~is_stop
        nxt = torch.where(grows, nxt, pad_id)
        tokens[state.ids, step] = nxt
        state.seen[torch.arange(len(live), device=device), nxt] |= grows
        state.lengths += grows.long()
        state.stopped |= is_stop
        state.done |= is_stop | (state.lengths >= state.max_new)
        if streamed and on_token is not None:
            _stream(on_token, rows, live, nxt, grows)
        last = step == max_new - 1
        if step % sync_every == sync_every - 1 or last:
            _mark_first_tokens(first_token, live, time.perf_counter() - started)
            if check is not None:
                _apply_check(check, state, live, reasons)
            if bool(state.done.all()) or last:
                break
            finished = int(state.done.sum())
            if len(live) >= _MIN_COMPACT_ROWS and finished >= COMPACT_AT * len(live):
                _finish_rows(state, reasons, live, lengths)
                keep = (~state.done).nonzero().flatten()
                live = [live[k] for k in keep.tolist()]
                state.select(keep)
                cache.batch_select_indices(keep)
                attention = attention[keep]
                position = position[keep]
                nxt = nxt[keep]
                if names is not None:
                    names = [names[k] for k in keep.tolist()]
        attention[:, width + step] = 1
        position = position + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=attention[:, : width + step + 1],
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            **({} if names is None else {"adapter_names": names}),
        )
        logits = out.logits[:, -1, :].float()
    _finish_rows(state, reasons, live, lengths)
    host_tokens, host_lengths = tokens.tolist(), lengths.tolist()
    return [
        DecodeResult(
            tokens=host_tokens[r][: host_lengths[r]],
            reason=reasons[r] or "length",
            first_token_s=first_token[r],
        )
        for r in range(n)
    ]


def _apply_check(check: Check, state: _Batch, live: list[int], reasons: list[str | None]) -> None:
    """End the live rows the host check names (cancelled, past their deadline)."""
    done_host = state.done.tolist()
    verdicts = iter(check([r for k, r in enumerate(live) if not done_host[k]]))
    for k, r in enumerate(live):
        if not done_host[k]:
            reason = next(verdicts)
            if reason is not None:
                reasons[r] = reason
                state.done[k] = True


def _finish_rows(
    state: _Batch, reasons: list[str | None], live: list[int], lengths: torch.Tensor
) -> None:
    """Record the lengths and end reasons of the rows now in the batch that are done."""
    lengths[state.ids] = state.lengths
    done, stopped = state.done.tolist(), state.stopped.tolist()
    for k, r in enumerate(live):
        if done[k] and reasons[r] is None:
            reasons[r] = "stop" if stopped[k] else "length"
