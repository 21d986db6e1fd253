"""The first sentence of a returning user's greeting, composed from what memory holds.

A small chat model told "pick up one of these points" mostly ignores the list, so the
recall is not left to it: the opener states one remembered fact in the second person and
the model adds a question about it (`ChatService.stream_greeting`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from chatbot.memory.facts import MemoryFact
from core.memory_extract.text import second_person

__all__ = ["recall_opener"]

_OPENERS = (
    "Welcome back{name}! Last time you told me {clause}.",
    "Good to see you again{name}! I remember {clause}.",
    "Hello again{name}! You mentioned that {clause}.",
)
_NAME = re.compile(r"\bname is ([A-Z][\w'-]{0,30})")
# The opener picks among the first few facts of the profile order (category, newest).
_CHOICES = 3


def recall_opener(facts: Sequence[MemoryFact], salt: str) -> str:
    """One or two sentences that recall a fact; "" when nothing is remembered.

    ``facts`` come in profile order; ``salt`` (the conversation id) varies the choice of
    fact and wording from one conversation to the next, deterministically.
    """
    name = ""
    others: list[MemoryFact] = []
    for fact in facts:
        found = _NAME.search(fact.text) if fact.key == "name" else None
        if found:
            name = name or found.group(1)
        else:
            others.append(fact)
    pick = int(hashlib.sha256(salt.encode("utf-8")).hexdigest(), 16)
    name_part = f", {name}" if name else ""
    if not others:
        return f"Welcome back{name_part}!" if name else ""
    fact = others[pick % min(_CHOICES, len(others))]
    template = _OPENERS[(pick // _CHOICES) % len(_OPENERS)]
    return template.format(name=name_part, clause=second_person(fact.text))
