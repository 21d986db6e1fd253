"""Preference pairs that would teach the wrong thing, found before DPO sees them.

`drifting_pairs`: a pair whose chosen reply is much less related to what the user just said
than its rejected reply teaches the bot to move away from the user. Relatedness is the
MiniLM cosine between a reply and the user's last message (the embedder the memory uses,
never the evaluation critic). Measured on the 2026-12-02 run's 1,448 pairs: 25.6% of them
prefer a reply less related by more than 0.1 (docs/results.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["TextEncoder", "drifting_pairs", "last_user_message"]


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


def last_user_message(prompt: Sequence[dict[str, Any]]) -> str:
    """The user's last message in a pair's prompt ("" when the bot speaks first)."""
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def _reply(side: str | Sequence[dict[str, Any]]) -> str:
    """A pair's reply: plain text (pairs.jsonl) or assistant messages (TRL's format)."""
    if isinstance(side, str):
        return side
    return "\n".join(str(m.get("content", "")) for m in side)


def drifting_pairs(
    pairs: Sequence[dict[str, Any]], encoder: TextEncoder, margin: float
) -> list[bool]:
    """For each pair: True when its chosen reply is less related to the user's last message
    than its rejected reply by more than `margin` (cosine)."""
    if margin < 0:
        raise ValueError("margin must be 0 or more")
    if not pairs:
        return []
    users = [last_user_message(p["prompt"]) for p in pairs]
    texts = [*users, *(_reply(p["chosen"]) for p in pairs), *(_reply(p["rejected"]) for p in pairs)]
    vectors = np.asarray(encoder.encode(texts), dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    n = len(pairs)
    user, chosen, rejected = vectors[:n], vectors[n : 2 * n], vectors[2 * n :]
    to_chosen = (user * chosen).sum(axis=1)
    to_rejected = (user * rejected).sum(axis=1)
    return [
        bool(u) and bool(c < r - margin)
        for u, c, r in zip(users, to_chosen, to_rejected, strict=True)
    ]
