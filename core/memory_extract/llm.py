"""The LLM extractor: typed JSON from a `ChatModel`, validated, with the rules as fallback."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

from core.memory_extract.records import (
    MAX_FACTS,
    MAX_TEXT_CHARS,
    ExtractedFact,
    FactExtractor,
    InvalidExtraction,
    normalise_key,
)
from core.prompting import load_prompt
from core.types import ChatMessage, ChatModel, GenerationParams, ModelError
from storage.memory_models import MEMORY_CATEGORIES

__all__ = ["LLMExtractor", "parse_llm_facts"]

log = logging.getLogger(__name__)

_SUBJECT_PREFIX = re.compile(r"^(?:the\s+user|user|they|he|she|the\s+writer|writer)\s+", re.I)
_STOPWORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "with",
        "from",
        "is",
        "are",
        "was",
        "has",
        "have",
        "their",
        "they",
        "them",
        "works",
        "work",
        "very",
        "really",
        "about",
        "into",
        "as",
        "by",
        "it",
        "this",
        "that",
    ]
)


def _grounded(text: str, message: str) -> bool:
    """At least one content word of the fact (by 4-letter stem) occurs in the message."""
    words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOPWORDS]
    lowered = message.lower()
    return any(w[:4] in lowered for w in words if len(w) >= 2)


def _first_json_object(text: str) -> str:
    text = re.sub(r"^```(?:json)?|```$", "", text.strip(), flags=re.MULTILINE).strip()
    start = text.find("{")
    if start < 0:
        raise InvalidExtraction("no JSON object in the output")
    depth = 0
    in_string = escape = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    raise InvalidExtraction("unterminated JSON object")


def parse_llm_facts(output: str, message: str | None = None) -> list[ExtractedFact]:
    """Validate the extraction JSON; raise `InvalidExtraction` when it is not usable.

    Items with a valid shape but empty or ungrounded text (no content word in `message`)
    are dropped rather than failing the whole output.
    """
    try:
        data = json.loads(_first_json_object(output))
    except json.JSONDecodeError as exc:
        raise InvalidExtraction(f"not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("facts"), list):
        raise InvalidExtraction('expected {"facts": [...]}')
    facts: list[ExtractedFact] = []
    for item in data["facts"]:
        if not isinstance(item, dict):
            raise InvalidExtraction("each fact must be an object")
        category, key, text = item.get("category"), item.get("key", ""), item.get("text")
        if category not in MEMORY_CATEGORIES:
            raise InvalidExtraction(f"unknown category {category!r}")
        if not isinstance(text, str) or not isinstance(key, str):
            raise InvalidExtraction("text and key must be strings")
        text = _SUBJECT_PREFIX.sub("", re.sub(r"\s+", " ", text).strip()).rstrip(".")
        if not text or len(text) > MAX_TEXT_CHARS:
            continue
        if message is not None and not _grounded(text, message):
            log.info("dropping ungrounded extracted fact")
            continue
        facts.append(ExtractedFact(category, normalise_key(key or category, category), text))
    return facts[:MAX_FACTS]


class LLMExtractor:
    """Typed-JSON extraction with a capable `ChatModel`; the rules are the fallback."""

    def __init__(
        self,
        model: ChatModel,
        *,
        fallback: FactExtractor,
        params: GenerationParams | None = None,
    ):
        self.model = model
        self.fallback = fallback
        self.params = params or GenerationParams(max_new_tokens=256, temperature=0.0)
        self.prompt = load_prompt("memory_extract")

    def extract(self, message: str) -> list[ExtractedFact]:
        if not message.strip():
            return []
        messages: Sequence[ChatMessage] = [
            ChatMessage("user", self.prompt.fill(message=message.replace("</message>", "")))
        ]
        try:
            completion = self.model.generate(messages, self.params)
            return parse_llm_facts(completion.text, message)
        except (ModelError, InvalidExtraction) as exc:
            log.warning("LLM memory extraction unusable (%s); using the rules extractor", exc)
            return self.fallback.extract(message)
