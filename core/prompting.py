"""Prompts are package data (`<package>/prompts/*.md`); this loads and fills them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources

from core.types import ChatMessage
from core.validation import InputError

__all__ = ["Prompt", "PromptTooLongError", "fit_prompt", "load_prompt"]


class PromptTooLongError(InputError):
    """Even the system prompt and the last message alone exceed the context window."""


class Prompt(str):
    """A prompt text that knows its name and a short content hash (its version)."""

    name: str
    version: str

    def __new__(cls, text: str, name: str) -> Prompt:
        obj = super().__new__(cls, text)
        obj.name = name
        obj.version = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        return obj

    def fill(self, **values: object) -> str:
        text = str(self)
        for key, value in values.items():
            text = text.replace("{" + key + "}", str(value))
        return text


@cache
def load_prompt(name: str, package: str = "core") -> Prompt:
    """Load `<package>/prompts/<name>.md` (placeholders are written `{name}`)."""
    text = resources.files(package).joinpath("prompts", f"{name}.md").read_text(encoding="utf-8")
    return Prompt(text.strip() + "\n", f"{package}/{name}")


def fit_prompt(
    messages: Sequence[ChatMessage],
    count_tokens: Callable[[Sequence[ChatMessage]], int],
    budget: int,
) -> list[ChatMessage]:
    """The messages cut to at most `budget` tokens: the oldest turns go first; a leading
    system prompt and the last message always stay (PromptTooLongError if they can't)."""
    system = list(messages[:1]) if messages and messages[0].role == "system" else []
    turns = list(messages[len(system) :])
    while len(turns) > 1 and count_tokens([*system, *turns]) > budget:
        turns.pop(0)
    fitted = [*system, *turns]
    if count_tokens(fitted) > budget:
        raise PromptTooLongError(
            f"The message is too long for the model's context window ({budget} tokens "
            "with room for the reply); please shorten it."
        )
    return fitted
