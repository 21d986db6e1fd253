"""Prompts are package data (`<package>/prompts/*.md`); this loads and fills them."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

__all__ = ["Prompt", "load_prompt"]


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
