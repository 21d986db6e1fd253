"""What extraction yields: typed facts and the slots a person has one value for."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = [
    "MAX_FACTS",
    "MAX_TEXT_CHARS",
    "SINGLE_VALUED_KEYS",
    "ExtractedFact",
    "FactExtractor",
    "InvalidExtraction",
    "normalise_key",
    "words",
]

# Slots a person has one value for: a newer contradicting fact replaces the old one.
SINGLE_VALUED_KEYS = frozenset(
    {
        "occupation",
        "employer",
        "workplace",
        "location",
        "hometown",
        "age",
        "relationship",
        "diet",
        "studies",
        "name",
    }
)
MAX_TEXT_CHARS = 200
MAX_FACTS = 8


def words(text: str) -> frozenset[str]:
    """A word list written as one whitespace-separated string."""
    return frozenset(text.split())


class InvalidExtraction(ValueError):
    """An LLM extraction output that does not match the expected typed JSON."""


@dataclass(frozen=True)
class ExtractedFact:
    category: str
    key: str
    # Third-person phrase with the subject left out, e.g. "restores old motorbikes".
    text: str
    # Unit-norm MiniLM vector of `text` when the extractor already computed it.
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)


class FactExtractor(Protocol):
    def extract(self, message: str) -> list[ExtractedFact]: ...


def normalise_key(key: str, category: str) -> str:
    """A slot name: lowercase snake case; unknown multi-valued slots become the category."""
    slot = re.sub(r"[^a-z0-9]+", "_", key.strip().lower()).strip("_")[:64]
    if slot in SINGLE_VALUED_KEYS or slot.startswith("favorite_"):
        return slot
    return category
