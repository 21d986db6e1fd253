"""Decoding pieces of the local backend: left-padded batches, next-token sampling, and the
prefix KV cache that lets a chat turn re-use its previous turn's keys and values."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.types import GenerationParams

__all__ = ["PrefixCache", "Sampler", "left_pad", "make_generator", "sample_batch"]

MIN_REUSE = 8  # shorter shared prefixes are not worth a cache lookup
NUCLEUS_CANDIDATES = 512  # top-p is applied within the 512 likeliest tokens


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


def left_pad(
    prompts: list[list[int]], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and position ids of a left-padded batch."""
    n, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention[r, width - len(p) :] = 1
    input_ids = input_ids.to(device)
    attention = attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention, positions


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def sample_batch(
    logits: torch.Tensor,
    seen: torch.Tensor,
    penalty: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One next token per row: repetition penalty, then greedy or temperature + top-p.

    Vectorised over the batch; only the final draw is per row (each row may have its own
    seeded generator).
    """
    pen = penalty[:, None]
    penalised = torch.where(logits > 0, logits / pen, logits * pen)
    logits = torch.where(seen, penalised, logits)
    choice = torch.argmax(logits, dim=-1)
    sampled = (temperature > 0).nonzero().flatten().tolist()
    if not sampled:
        return choice
    k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    top_logits, top_ids = torch.topk(logits, k, dim=-1)
    probs = torch.softmax(top_logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    cumulative = probs.cumsum(dim=-1)
    keep = (cumulative - probs) < top_p[:, None]
    keep[:, 0] = True
    probs = (probs * keep).cpu()
    for r in sampled:
        pick = torch.multinomial(probs[r], 1, generator=generators[r])
        choice[r] = top_ids[r, int(pick)]
    return choice


@dataclass
class Sampler:
    """The sampling settings of every row of a batch, as tensors on the model's device."""

    penalty: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    generators: list[torch.Generator | None]

    @classmethod
    def for_rows(
        cls, params: Sequence[GenerationParams], seeds: Sequence[int | None], device: str
    ) -> Sampler:
        return cls(
            penalty=torch.tensor([p.repetition_penalty or 1.0 for p in params], device=device),
            temperature=torch.tensor([p.temperature for p in params], device=device),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            generators=[make_generator(seed) for seed in seeds],
        )

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        return sample_batch(
            logits, seen, self.penalty, self.temperature, self.top_p, self.generators
        )
