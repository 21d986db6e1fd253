"""LLM generation of new backgrounds, with validation, bounded retries and near-duplicate
rejection (a candidate whose highest MiniLM cosine to the pool exceeds the threshold is
dropped, as in ALOE)."""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.prompting import load_prompt
from core.types import ChatMessage, ChatModel, GenerationParams, ModelError
from personas.composer import load_pools
from personas.diversity import TextEncoder, max_similarity
from personas.records import Persona, Traits, word_count
from personas.taxonomy import Taxonomy, load_taxonomy

__all__ = [
    "Candidate",
    "GenerationReport",
    "GeneratorConfig",
    "PersonaGenerator",
    "parse_candidate",
]

log = logging.getLogger(__name__)

_JSON_RE = re.compile(r"\{.*\}", re.DOTALL)
_WORD_RE = re.compile(r"[a-z][a-z'-]+")
_STOP = frozenset(
    [
        "about",
        "after",
        "also",
        "and",
        "before",
        "been",
        "from",
        "have",
        "into",
        "more",
        "most",
        "only",
        "other",
        "over",
        "some",
        "such",
        "than",
        "that",
        "their",
        "them",
        "then",
        "they",
        "this",
        "very",
        "what",
        "when",
        "with",
        "years",
        "year",
        "works",
        "work",
    ]
)
_REQUIRED = ("background", "occupation", "education", "personality", "flaws", "hobbies")


@dataclass(frozen=True)
class GeneratorConfig:
    threshold: float = 0.6
    max_attempts: int = 3  # model calls per requested user, first try included
    min_words: int = 50
    max_words: int = 100
    setback_share: float = 0.35
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 320
    batch_size: int = 8


@dataclass(frozen=True)
class Candidate:
    background: str
    traits: Traits


@dataclass
class GenerationReport:
    personas: list[Persona] = field(default_factory=list)
    requested: int = 0
    attempts: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def acceptance_rate(self) -> float:
        return len(self.personas) / self.attempts if self.attempts else 0.0


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return []


def _mentions(background_words: set[str], phrase: str) -> bool:
    """True if a content word of `phrase` (or its 5-letter stem) occurs in the background."""
    words = [w for w in _WORD_RE.findall(phrase.lower()) if len(w) >= 4 and w not in _STOP]
    if not words:
        return True
    stems = {w[:5] for w in background_words}
    return any(w in background_words or w[:5] in stems for w in words)


def parse_candidate(
    text: str, name: str, min_words: int = 50, max_words: int = 100
) -> tuple[Candidate | None, str]:
    """Check one model output. Returns (candidate, "ok") or (None, rejection reason)."""
    match = _JSON_RE.search(text)
    if not match:
        return None, "no_json"
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None, "invalid_json"
    if not isinstance(data, dict):
        return None, "invalid_json"
    missing = [k for k in _REQUIRED if not data.get(k)]
    if missing:
        return None, f"missing_field:{missing[0]}"
    background = " ".join(str(data["background"]).split())
    words = word_count(background)
    if not min_words <= words <= max_words:
        return None, "word_count"
    if name.lower() not in background.lower():
        return None, "missing_name"
    occupation, education = str(data["occupation"]), str(data["education"])
    personality, flaws = _as_list(data["personality"]), _as_list(data["flaws"])
    hobbies = _as_list(data["hobbies"])
    if not (personality and flaws and hobbies):
        return None, "missing_field:traits"
    background_words = set(_WORD_RE.findall(background.lower()))
    checks = {
        "occupation": [occupation],
        "education": [education],
        "flaw": flaws[:1],
        "hobby": hobbies[:1],
    }
    for element, phrases in checks.items():
        if not all(_mentions(background_words, p) for p in phrases):
            return None, f"missing_element:{element}"
    setback = data.get("setback")
    setback = (
        str(setback).strip() if setback and str(setback).lower() not in ("none", "null") else None
    )
    traits = Traits(
        occupation=occupation,
        education=education,
        personality=tuple(personality),
        flaws=tuple(flaws),
        hobbies=tuple(hobbies),
        setback=setback,
    )
    return Candidate(background=background, traits=traits), "ok"


@dataclass
class _Slot:
    index: int
    code: str
    name: str
    gender: str
    with_setback: bool
    tries: int = 0


class PersonaGenerator:
    """Writes new backgrounds with any `ChatModel` (local HF model or OpenAI-compatible)."""

    def __init__(
        self,
        model: ChatModel,
        encoder: TextEncoder,
        *,
        pool: Sequence[str] = (),
        taken_names: Sequence[str] = (),
        config: GeneratorConfig | None = None,
        taxonomy: Taxonomy | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.encoder = encoder
        self.config = config or GeneratorConfig()
        self.taxonomy = taxonomy or load_taxonomy()
        self.rng = random.Random(f"persona-generator:{seed}")
        self.seed = seed
        self.prompt = load_prompt("persona_background", package="personas")
        self._pool = encoder.encode(list(pool)) if pool else np.zeros((0, 384), np.float32)
        self._names = set(taken_names)
        self._cultures = load_pools()[1]["cultures"]

    def _draw_name(self) -> tuple[str, str]:
        while True:
            culture = self.rng.choice(self._cultures)
            gender = self.rng.choice(("female", "male"))
            given = self.rng.choice(culture[gender])
            surname = self.rng.choice(culture["surnames"])
            if gender == "female":
                surname += culture.get("female_surname_suffix", "")
            full = f"{surname} {given}" if culture.get("family_first") else f"{given} {surname}"
            if full not in self._names:
                self._names.add(full)
                return full, gender

    def _messages(self, slot: _Slot) -> list[ChatMessage]:
        group = self.taxonomy.sub_major(slot.code)
        examples = ", ".join(u.title for u in group.examples)
        setback = (
            "This person has had a real setback (fired, demoted, a failed venture, burnout or "
            "similar); mention it."
            if slot.with_setback
            else 'No major career setback; set "setback" to null.'
        )
        text = self.prompt.fill(
            name=slot.name,
            gender=slot.gender,
            group_title=group.title,
            example_occupations=examples,
            setback_instruction=setback,
            min_words=self.config.min_words,
            max_words=self.config.max_words,
        )
        return [ChatMessage("user", text)]

    def generate(
        self,
        n: int,
        *,
        groups: Sequence[str] | None = None,
        split_of: Callable[[str], str] = lambda code: "train",
        set_name: str = "generated",
        progress: Callable[[GenerationReport], None] | None = None,
    ) -> GenerationReport:
        """Try to produce `n` accepted users; each gets at most `max_attempts` model calls."""
        cfg = self.config
        codes = list(groups) if groups else list(self.taxonomy.codes)
        for code in codes:
            self.taxonomy.sub_major(code)
        report = GenerationReport(requested=n)
        slots = []
        for index in range(n):
            name, gender = self._draw_name()
            slots.append(
                _Slot(
                    index=index,
                    code=codes[index % len(codes)],
                    name=name,
                    gender=gender,
                    with_setback=self.rng.random() < cfg.setback_share,
                )
            )
        pending = list(slots)
        while pending:
            batch, pending = pending[: cfg.batch_size], pending[cfg.batch_size :]
            params = GenerationParams(
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                repetition_penalty=1.05,
                seed=self.rng.randrange(2**31),
            )
            try:
                outputs = [c.text for c in self.model.generate_batch(
                    [self._messages(s) for s in batch], params
                )]  # fmt: skip
            except ModelError as exc:
                log.warning("persona generation batch failed: %s", exc)
                outputs = [None] * len(batch)
            for slot, output in zip(batch, outputs, strict=True):
                slot.tries += 1
                report.attempts += 1
                reason = self._consider(slot, output, report, split_of, set_name)
                if reason != "ok":
                    report.rejected[reason] += 1
                    log.debug("rejected candidate for %s: %s", slot.name, reason)
                    if slot.tries < cfg.max_attempts:
                        pending.append(slot)
            if progress is not None:
                progress(report)
        report.personas.sort(key=lambda p: p.id)
        return report

    def _consider(
        self,
        slot: _Slot,
        output: str | None,
        report: GenerationReport,
        split_of: Callable[[str], str],
        set_name: str,
    ) -> str:
        if output is None:
            return "model_error"
        cfg = self.config
        candidate, reason = parse_candidate(output, slot.name, cfg.min_words, cfg.max_words)
        if candidate is None:
            return reason
        vector = self.encoder.encode([candidate.background])
        if float(max_similarity(vector, self._pool)[0]) > cfg.threshold:
            return "near_duplicate"
        self._pool = np.vstack([self._pool, vector]) if len(self._pool) else vector
        group = self.taxonomy.sub_major(slot.code)
        report.personas.append(
            Persona(
                id=f"{set_name}:{slot.code}-{self.seed}-{slot.index:04d}",
                name=slot.name,
                background=candidate.background,
                split=split_of(slot.code),
                isco_code=slot.code,
                isco_title=group.title,
                source=set_name,
                traits=candidate.traits,
            )
        )
        return "ok"

    def is_near_duplicate(self, background: str) -> bool:
        """The same test `generate` applies: max cosine to the current pool > threshold."""
        vector = self.encoder.encode([background])
        return float(max_similarity(vector, self._pool)[0]) > self.config.threshold
