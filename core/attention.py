"""Grouped-query attention for batched decoding without copying the KV cache.

With a padding mask, `transformers` (5.17 on the GPU image) expands every key/value head
to each of its query heads (`repeat_kv`) before SDPA, in every layer at every step: at 2,000
rows that copy was 55% of the H200's decode time (bench/gpu/decode_profile.py). For one
query token, the query heads of a group can instead sit in SDPA's query-length dimension,
so each key/value head is read once and nothing is copied. Newer `transformers` releases do
the same (`pack_gqa`); this keeps any installed version fast.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["GROUPED_SDPA", "grouped_sdpa_attention", "use_grouped_attention"]

GROUPED_SDPA = "upc_grouped_sdpa"


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA with a decode step's query heads grouped per key/value head; else stock SDPA."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if groups == 1 or q_len != 1 or module.training:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = query.reshape(batch, heads // groups, groups, dim)
    mask = attention_mask
    if mask is not None and mask.shape[1] != 1:
        mask = mask[:, :1]  # a padding mask is the same for every head
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=mask, scale=scaling
    )
    # (batch, kv heads, groups, dim) -> (batch, 1, heads, dim), the layout callers expect.
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_grouped_attention(model: Any) -> bool:
    """Switch a model that uses SDPA with grouped-query heads to the grouped decode path."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads or kv_heads == heads or getattr(config, "_attn_implementation", "") != "sdpa":
        return False
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)
    return True
