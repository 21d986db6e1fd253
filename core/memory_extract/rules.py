"""The rules extractor: first-person self-disclosure patterns plus MiniLM classification.

A message is cut into the clauses that may state a fact (`text.statements`: no questions,
conditionals, instructions, quotes, or clauses about the other person); each clause is
matched against `patterns.RULES`; the match becomes one atomic third-person fact per list
item (`text.atomic`). Clauses whose category the pattern leaves open are classified by the
embedder against prototype phrases, and dropped when they look like no background.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from core.embeddings import Embedder
from core.memory_extract.patterns import (
    ACTIVITY_VERBS,
    HOBBY_VERBS,
    NOT_DISCLOSURE,
    OPEN_MIN_SIMILARITY,
    PROTOTYPES,
    RULES,
    TRANSIENT,
    Rule,
)
from core.memory_extract.records import MAX_FACTS, MAX_TEXT_CHARS, ExtractedFact
from core.memory_extract.text import atomic, clean_object, reaction, statements, third_person

__all__ = ["Candidate", "RulesExtractor"]

_I_AM = re.compile(r"i(?:'m|\s+am|m)\s+(.*)", re.IGNORECASE)
_LEAD_IN = re.compile(
    r"^(?:(?:oh|yeah|yes|yep|no|nope|well|so|haha+|lol|wow|um+|hmm+|honestly|actually|"
    r"personally|ok|okay|sure|also|and|but|plus|anyway|in\s+my\s+(?:free|spare)\s+time|"
    r"these\s+days|nowadays|right\s+now|currently|on\s+weekends|at\s+the\s+moment)"
    r"\b[\s,!]*)+",
    re.IGNORECASE,
)
# Starts of "I'm ..." clauses that look like a passing state but state a fact.
_NOT_TRANSIENT = re.compile(
    r"(?:not\s+(?:really\s+|much\s+|very\s+)?(?:into|a\s+(?:big\s+)?fan\s+of)|"
    r"going\s+to\s+(?:\w+\s+){0,2}(?:school|college|university)|excited\s+to)\b"
)
_ADVERBS = re.compile(
    r"^(?:(?:also|really|actually|currently|now|still|just|very|so|quite|pretty|too)\s+)+"
)


@dataclass(frozen=True)
class Candidate:
    """One fact a pattern found, before classification."""

    category: str | None
    key: str | None
    text: str
    # "I'm a/an X" describes the person even when no category fits: keep it as "other".
    self_description: bool = False


def _is_activity(text: str) -> bool:
    """ "likes to hike", "loves hiking": the object is something one does."""
    verb, _, rest = text.partition(" ")
    first = rest.split()[0].lower() if rest else ""
    return verb.lower() in ACTIVITY_VERBS and (first == "to" or first.endswith("ing"))


def _facts_of(rule: Rule, groups: list[str]) -> list[Candidate]:
    template = rule.template
    if template == "favourite":
        thing = re.sub(r"[^a-z0-9]+", "_", groups[0].lower()).strip("_")
        head = f"their favourite {groups[0]} {'are' if thing.endswith('s') else 'is'}"
        return [
            Candidate("preference", f"favorite_{thing}"[:64], t) for t in atomic(head, groups[1])
        ]
    if template == "{verb}":
        verb, _, rest = groups[0].partition(" ")
        if not rest and verb.lower() in HOBBY_VERBS:
            return [Candidate("hobby", "hobby", third_person(verb, ""))]
        negated = verb.lower() in ("don't", "never")
        checked = rest.split()[0].lower() if negated and rest else verb.lower()
        if (checked in NOT_DISCLOSURE and rule.strict) or not rest:
            return []
        conjugated = third_person(verb, rest)
        head, _, rest = conjugated.partition(" ")
        if head in ("doesn't", "can't", "didn't", "never") or (
            head == "does" and rest.startswith("not ")
        ):
            head2, _, rest = rest.partition(" ")
            head = f"{head} {head2}"
        hobby_verb = verb.lower() in HOBBY_VERBS
        if verb.lower() in ACTIVITY_VERBS and reaction(rest):
            return []
        out = []
        for text in atomic(head, rest, verbal_head=rule.category is None):
            liked = text[len(head) :].strip()
            if verb.lower() in ACTIVITY_VERBS and reaction(liked):
                continue
            category = rule.category or ("hobby" if hobby_verb else None)
            key = rule.key or category
            if category == "preference" and _is_activity(text):
                category = key = "hobby"
            out.append(Candidate(category, key, text))
        return out
    if template == "{0}":
        words = groups[0].split()
        split_at = 3 if len(words) > 3 and words[2] in ("is", "are", "has", "have") else 2
        head, rest = " ".join(words[:split_at]), " ".join(words[split_at:])
        texts = atomic(head, rest) if rest else []
    else:
        prefix = template.split("{0}")[0].strip()
        suffix = template.split("{0}")[1] if "{0}" in template else ""
        texts = [t + suffix for t in atomic(prefix, groups[0])]
    return [
        Candidate(
            rule.category,
            rule.key,
            text,
            rule.category is None and text.startswith(("is a ", "is an ", "is the ", "is more of")),
        )
        for text in texts
        if len(text.split()) >= 2
    ]


def match_clause(clause: str) -> list[Candidate]:
    """The facts one clause states about its writer ([] for none)."""
    clause = _LEAD_IN.sub("", clause).strip()
    if not re.match(r"(?:i\b|i'm\b|im\b|i've\b|my\b)", clause, re.IGNORECASE):
        return []
    after_am = _I_AM.match(clause)
    if after_am:
        rest = _ADVERBS.sub("", after_am.group(1).lower())
        if TRANSIENT.match(rest) and not _NOT_TRANSIENT.match(rest):
            return []
    for rule in RULES:
        match = rule.pattern.fullmatch(clause)
        if match is None:
            continue
        groups = [clean_object(g or "")[:MAX_TEXT_CHARS] for g in match.groups()]
        if not all(groups):
            return []
        return _facts_of(rule, groups)
    return []


class RulesExtractor:
    """Self-disclosure patterns plus MiniLM classification; no LLM needed.

    Without an embedder only clauses with a pattern-given category are kept.
    """

    def __init__(
        self, embedder: Embedder | None = None, *, min_similarity: float = OPEN_MIN_SIMILARITY
    ):
        self.embedder = embedder
        self.min_similarity = min_similarity
        self._prototype_vectors: tuple[list[str], np.ndarray] | None = None

    def _prototypes(self) -> tuple[list[str], np.ndarray]:
        if self._prototype_vectors is None:
            assert self.embedder is not None
            labels = [cat for cat, texts in PROTOTYPES.items() for _ in texts]
            texts = [t for ts in PROTOTYPES.values() for t in ts]
            self._prototype_vectors = (labels, self.embedder.encode(texts))
        return self._prototype_vectors

    def _classify(self, vectors: np.ndarray) -> list[tuple[str, float]]:
        labels, protos = self._prototypes()
        sims = vectors @ protos.T
        out = []
        for row in sims:
            best: dict[str, float] = {}
            for label, sim in zip(labels, row, strict=True):
                best[label] = max(best.get(label, -1.0), float(sim))
            category = max(best, key=best.__getitem__)
            out.append((category, best[category]))
        return out

    def candidates(self, message: str) -> list[Candidate]:
        """Pattern matches before classification (exposed for tests and debugging)."""
        return [c for clause in statements(message) for c in match_clause(clause)]

    def extract(self, message: str) -> list[ExtractedFact]:
        candidates = self.candidates(message)
        if not candidates:
            return []
        vectors = self.embedder.encode([c.text for c in candidates]) if self.embedder else None
        classes = self._classify(vectors) if vectors is not None else None
        facts: list[ExtractedFact] = []
        seen: set[str] = set()
        for i, cand in enumerate(candidates):
            category, key = cand.category, cand.key
            if category is None:
                if classes is None:
                    continue
                category, similarity = classes[i]
                if similarity < self.min_similarity:
                    if not cand.self_description:
                        continue
                    category = "other"
                key = category
            if cand.text.lower() in seen:
                continue
            seen.add(cand.text.lower())
            facts.append(
                ExtractedFact(
                    category=category,
                    key=key or category,
                    text=cand.text,
                    vector=vectors[i] if vectors is not None else None,
                )
            )
        return facts[:MAX_FACTS]
