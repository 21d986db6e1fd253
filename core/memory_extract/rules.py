"""The rules extractor: first-person self-disclosure patterns plus MiniLM classification."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from core.embeddings import Embedder
from core.memory_extract.records import MAX_FACTS, MAX_TEXT_CHARS, ExtractedFact

__all__ = ["RulesExtractor"]

_ADV = r"(?:(?:also|really|actually|currently|now|still|just|recently|mostly|usually)\s+)*"
_I_AM = r"i(?:'m|\s+am|m)\s+" + _ADV
_I_HAVE = r"i(?:'ve|\s+have)\s+(?:got\s+)?" + _ADV
_NUM = r"(?:a|an|one|two|three|four|five|six|seven|eight|nine|ten|\d{1,2})"
_FAMILY_NOUN = (
    r"(?:kids?|children|child|sons?|daughters?|brothers?|sisters?|siblings?|wife|husband|"
    r"partner|boyfriend|girlfriend|fianc[eé]e?|twins|grand(?:children|kids|sons?|daughters?)|"
    r"dogs?|cats?|pets?|toddlers?|babies|baby|stepsons?|stepdaughters?)"
)
_FAMILY_WORD = (
    r"(?:wife|husband|partner|son|daughter|kids?|children|mom|mum|mother|dad|father|brother|"
    r"sister|parents|family|dog|cat|grandmother|grandfather|grandma|grandpa|boyfriend|girlfriend)"
)
_HOBBY_VERBS = [
    "play",
    "plays",
    "paint",
    "draw",
    "knit",
    "crochet",
    "cook",
    "bake",
    "garden",
    "hike",
    "run",
    "jog",
    "swim",
    "climb",
    "cycle",
    "bike",
    "sing",
    "dance",
    "write",
    "read",
    "collect",
    "restore",
    "build",
    "fish",
    "surf",
    "ski",
    "snowboard",
    "sew",
    "brew",
    "volunteer",
    "practice",
    "practise",
    "skate",
    "sail",
    "row",
    "box",
    "train",
    "lift",
    "meditate",
    "photograph",
    "film",
    "blog",
    "tinker",
    "woodwork",
    "camp",
    "hunt",
    "golf",
]
_NOT_DISCLOSURE = [
    "think",
    "thought",
    "guess",
    "know",
    "knew",
    "mean",
    "meant",
    "want",
    "wanted",
    "need",
    "needed",
    "hope",
    "feel",
    "felt",
    "see",
    "saw",
    "agree",
    "disagree",
    "wonder",
    "believe",
    "suppose",
    "bet",
    "understand",
    "remember",
    "forgot",
    "said",
    "say",
    "asked",
    "ask",
    "told",
    "tell",
    "was",
    "did",
    "do",
    "don't",
    "can",
    "can't",
    "could",
    "would",
    "should",
    "will",
    "might",
    "must",
    "just",
    "wish",
    "doubt",
    "heard",
    "hear",
    "read'd",
    "apologize",
    "apologise",
    "appreciate",
    "promise",
    "swear",
]
_TRANSIENT = re.compile(
    r"^(?:a\s+)?(?:bit|little|lot|tad|bot|ai|sure|not|fine|good|great|ok|okay|well|sorry|glad|"
    r"happy to|here|back|tired|hungry|bored|confused|curious|wondering|asking|kidding|joking|"
    r"done|ready|listening|afraid (?:i|that)|going to|gonna|about to|trying to understand)\b"
)
_SECOND_PERSON = re.compile(r"\b(?:you|your|yours|yourself|u|ur)\b", re.IGNORECASE)
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|im|i've|i'd|my|me)\b", re.IGNORECASE)
_CLAUSE_SPLIT = re.compile(
    r"(?:\s*[,;]\s*(?:and|but|so|also|plus|while)?\s*|\s+(?:and|but|so|also|plus|while)\s+)"
    r"(?:(?:now|then|also|currently|today)\s+)?(?=(?:i|i'm|i've|my)\b)",
    re.IGNORECASE,
)

# Each category gets a few prototype phrases in the same subject-less third-person form as
# the fact texts; a clause is classified by its best cosine to them.
_PROTOTYPES: dict[str, tuple[str, ...]] = {
    "occupation": (
        "works as a nurse in a hospital",
        "is a software engineer at a tech company",
        "is a teacher",
        "works as an accountant",
        "runs a small business",
        "is a lawyer",
        "is a doctor",
        "works in marketing",
        "is a chef in a restaurant",
        "is an electrician",
        "is an engineer",
        "is a designer",
        "is a manager",
        "is a scientist",
        "is a mechanic",
        "works as a professional in their field",
    ),
    "education": (
        "studied computer science at university",
        "is a student",
        "has a degree in biology",
        "is doing a PhD",
        "is learning a foreign language",
        "graduated from college",
    ),
    "hobby": (
        "enjoys hiking in the mountains",
        "plays the guitar",
        "restores old motorbikes",
        "paints watercolours on weekends",
        "likes gardening",
        "plays football with friends",
        "collects stamps",
        "goes running every morning",
        "is a keen photographer",
    ),
    "family": (
        "has two kids",
        "is married",
        "has a daughter",
        "is a mother of three",
        "has a dog",
        "takes care of elderly parents",
        "their wife is a teacher",
    ),
    "preference": (
        "loves spicy food",
        "prefers tea to coffee",
        "is vegetarian",
        "hates cold weather",
        "likes jazz music",
        "their favourite film is a comedy",
        "is a big fan of science fiction",
    ),
    "concern": (
        "is worried about an upcoming exam",
        "is stressed about work",
        "is looking for a new job",
        "is preparing for a job interview",
        "is struggling with sleep",
        "is going through a divorce",
        "is saving money to buy a house",
    ),
    "location": (
        "lives in Paris",
        "is from Brazil",
        "moved to a new city",
        "lives in a small town near the coast",
    ),
}
# Below this best-prototype cosine an open-ended clause is not considered background.
_OPEN_MIN_SIMILARITY = 0.35


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    category: str | None  # None: classify with the embedder
    key: str | None  # None: the category (or `occupation` when classified so)
    template: str  # how to rewrite the match, with {0}, {1}, ... groups


def _r(pattern: str, category: str | None, key: str | None, template: str) -> _Rule:
    return _Rule(re.compile(pattern, re.IGNORECASE), category, key, template)


_RULES: tuple[_Rule, ...] = (
    _r(_I_AM + r"(\d{1,3})\s*(?:years?\s+old|yo|y/o)\b", "other", "age", "is {0} years old"),
    _r(r"i\s+" + _ADV + r"work(?:s)?\s+as\s+(.+)", "occupation", "occupation", "works as {0}"),
    _r(r"my\s+(?:job|profession|occupation)\s+is\s+(.+)", "occupation", "occupation", "is {0}"),
    _r(
        r"i\s+" + _ADV + r"work\s+(?:at|for)\s+(.+)",
        "occupation",
        "employer",
        "works at {0}",
    ),
    _r(r"i\s+" + _ADV + r"work\s+in\s+(.+)", "occupation", "workplace", "works in {0}"),
    _r(r"i\s+" + _ADV + r"(?:have\s+)?studied\s+(.+)", "education", "education", "studied {0}"),
    _r(_I_AM + r"studying\s+(.+)", "education", "studies", "is studying {0}"),
    _r(
        _I_HAVE + r"((?:a|an)\s+(?:degree|phd|doctorate|master'?s|bachelor'?s|diploma|mba)\b.*)",
        "education",
        "education",
        "has {0}",
    ),
    _r(r"i\s+" + _ADV + r"graduated\s+(.+)", "education", "education", "graduated {0}"),
    _r(
        _I_AM + r"((?:a|an)\s+(?:\w+\s+)?(?:student|undergrad|undergraduate|grad student|"
        r"phd student|pupil)\b.*)",
        "education",
        "studies",
        "is {0}",
    ),
    _r(r"i\s+" + _ADV + r"live\s+(in\s+.+)", "location", "location", "lives {0}"),
    _r(_I_AM + r"based\s+(in\s+.+)", "location", "location", "is based {0}"),
    _r(r"i(?:'ve|\s+have)?\s+" + _ADV + r"moved\s+(to\s+.+)", "location", "location", "moved {0}"),
    _r(_I_AM + r"((?:originally\s+)?from\s+.+)", "location", "hometown", "is {0}"),
    _r(
        _I_AM + r"((?:happily\s+)?(?:married|divorced|single|engaged|widowed|separated)\b.*)",
        "family",
        "relationship",
        "is {0}",
    ),
    _r(
        _I_HAVE + r"(" + _NUM + r"\s+(?:\w+\s+)?" + _FAMILY_NOUN + r"\b.*)",
        "family",
        "family",
        "has {0}",
    ),
    _r(
        _I_AM + r"((?:a|an)\s+(?:\w+\s+)?(?:mom|mum|mother|dad|father|parent|grandparent|"
        r"grandmother|grandfather|stepmom|stepdad)\b.*)",
        "family",
        "family",
        "is {0}",
    ),
    _r(r"(my\s+" + _FAMILY_WORD + r"\b.+)", "family", "family", "{0}"),
    _r(
        r"my\s+(?:favou?rite\s+)?(?:hobby|hobbies|pastime|pastimes|passion)\s+(?:is|are|include)"
        r"\s+(.+)",
        "hobby",
        "hobby",
        "enjoys {0}",
    ),
    _r(r"my\s+favou?rite\s+(\w+(?:\s+\w+)?)\s+is\s+(.+)", "preference", None, "favourite"),
    _r(
        r"(?:in\s+my\s+(?:free|spare)\s+time,?\s+)i\s+(.+)",
        "hobby",
        "hobby",
        "in their free time {0}",
    ),
    _r(
        _I_AM + r"(?:really\s+|very\s+|quite\s+|so\s+|a\s+bit\s+|a\s+little\s+)?"
        r"((?:worried|anxious|nervous|stressed|concerned|scared|afraid|excited)\s+"
        r"(?:about|of|for|that)\s+.+)",
        "concern",
        "concern",
        "is {0}",
    ),
    _r(
        _I_AM + r"((?:preparing\s+for|dealing\s+with|struggling\s+with|going\s+through|"
        r"looking\s+for|saving\s+(?:up\s+)?for|recovering\s+from|training\s+for|planning\s+to|"
        r"trying\s+to)\s+.+)",
        "concern",
        "concern",
        "is {0}",
    ),
    _r(
        _I_AM + r"((?:vegetarian|vegan|pescatarian|gluten[- ]free|lactose[- ]intolerant|"
        r"a\s+vegetarian|a\s+vegan)\b.*)",
        "preference",
        "diet",
        "is {0}",
    ),
    _r(
        _I_AM + r"((?:really\s+)?(?:into|passionate\s+about|obsessed\s+with|"
        r"a\s+(?:big\s+|huge\s+)?fan\s+of)\s+.+)",
        None,
        None,
        "is {0}",
    ),
    _r(
        r"i\s+" + _ADV + r"((?:love|enjoy|adore)\s+\w+ing\b.*)",
        "hobby",
        "hobby",
        "{verb}",
    ),
    _r(
        r"i\s+" + _ADV + r"((?:love|like|enjoy|adore|prefer|hate|dislike|can't\s+stand|"
        r"don't\s+like|do\s+not\s+like)\s+.+)",
        "preference",
        "preference",
        "{verb}",
    ),
    _r(_I_AM + r"((?:a|an)\s+.+)", None, None, "is {0}"),
    _r(_I_HAVE + r"(been\s+\w+ing\b.+)", None, None, "has {0}"),
    _r(_I_AM + r"(learning\s+.+)", None, None, "is {0}"),
    _r(_I_AM + r"(working\s+on\s+.+)", None, None, "is {0}"),
    _r(r"i\s+" + _ADV + r"([a-z]+\s+.+\s+for\s+a\s+living)", "occupation", "occupation", "{verb}"),
    _r(r"i\s+" + _ADV + r"([a-z]+\s+.+)", None, None, "{verb}"),
)

_PRONOUNS = (
    (re.compile(r"\bmyself\b", re.IGNORECASE), "themselves"),
    (re.compile(r"\bmine\b", re.IGNORECASE), "theirs"),
    (re.compile(r"\bmy\b", re.IGNORECASE), "their"),
    (re.compile(r"\bme\b", re.IGNORECASE), "them"),
    (re.compile(r"\bi'm\b|\bi\s+am\b", re.IGNORECASE), "they are"),
    (re.compile(r"\bi've\b", re.IGNORECASE), "they have"),
    (re.compile(r"\bi\b", re.IGNORECASE), "they"),
)
_THIRD_PERSON_IRREGULAR = {"have": "has", "do": "does", "go": "goes", "be": "is"}


def _third_person_verb(verb: str) -> str:
    lower = verb.lower()
    if lower in _THIRD_PERSON_IRREGULAR:
        return _THIRD_PERSON_IRREGULAR[lower]
    if re.search(r"(?:s|sh|ch|x|z|o)$", lower):
        return lower + "es"
    if re.search(r"[^aeiou]y$", lower):
        return lower[:-1] + "ies"
    return lower + "s"


def _conjugate_phrase(verb: str, rest: str) -> str:
    """First-person verb phrase to third person: "love hiking" -> "loves hiking"."""
    lower = verb.lower()
    if lower in ("don't", "do") and re.match(r"(?:not\s+)?\w", rest):
        return ("doesn't " if lower == "don't" else "does ") + rest
    if lower == "can't":
        return f"can't {rest}"
    return f"{_third_person_verb(verb)} {rest}"


def _clean_object(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"[\s,;:.!…-]+$", "", text)
    for pattern, replacement in _PRONOUNS:
        text = pattern.sub(replacement, text)
    return text[:MAX_TEXT_CHARS].strip()


def _sentences(message: str) -> list[tuple[str, bool]]:
    """(sentence, is_question) pairs."""
    text = message.replace("’", "'").replace("‘", "'")
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    out = []
    for part in parts:
        part = part.strip()
        if part:
            out.append((part.rstrip(".!"), part.endswith("?")))
    return out


def _clauses(sentence: str) -> list[str]:
    pieces = _CLAUSE_SPLIT.split(sentence)
    return [p.strip(" ,;") for p in pieces if p and p.strip(" ,;")]


@dataclass(frozen=True)
class _Candidate:
    category: str | None
    key: str | None
    text: str
    # "I'm a/an X" describes the person even when no category fits: keep it as "other".
    self_description: bool = False


def _match_clause(clause: str) -> _Candidate | None:
    # Addressing the assistant ("I want you to ...") is a request, not background.
    if _SECOND_PERSON.search(clause):
        return None
    lowered = clause.lower()
    if not re.match(r"(?:i\b|i'm\b|im\b|i've\b|my\b|in my)", lowered):
        return None
    if re.match(r"i(?:'d|'ll|\s+would|\s+will)\b", lowered):
        return None  # hypotheticals and plans of the moment
    after_am = re.match(_I_AM + r"(.*)", clause, re.IGNORECASE)
    if after_am and _TRANSIENT.match(after_am.group(1).lower()):
        return None
    for rule in _RULES:
        match = rule.pattern.fullmatch(clause)
        if match is None:
            continue
        groups = [_clean_object(g or "") for g in match.groups()]
        if not all(groups) and rule.template != "favourite":
            return None
        if rule.template == "favourite":
            thing = re.sub(r"[^a-z0-9]+", "_", groups[0].lower()).strip("_")
            return _Candidate(
                "preference",
                f"favorite_{thing}"[:64],
                f"their favourite {groups[0]} is {groups[1]}",
            )
        if rule.template == "{verb}":
            verb, _, rest = groups[0].partition(" ")
            if (verb.lower() in _NOT_DISCLOSURE and rule.category is None) or not rest:
                return None
            category = rule.category or ("hobby" if verb.lower() in _HOBBY_VERBS else None)
            key = rule.key or category
            return _Candidate(category, key, _conjugate_phrase(verb, rest))
        text = rule.template.format(*groups)
        if len(text.split()) < 2:
            return None
        return _Candidate(
            rule.category,
            rule.key,
            text,
            rule.template == "is {0}"
            and rule.category is None
            and text.startswith(("is a ", "is an ")),
        )
    return None


class RulesExtractor:
    """Self-disclosure patterns plus MiniLM classification; no LLM needed.

    Without an embedder only clauses with a pattern-given category are kept.
    """

    def __init__(
        self, embedder: Embedder | None = None, *, min_similarity: float = _OPEN_MIN_SIMILARITY
    ):
        self.embedder = embedder
        self.min_similarity = min_similarity
        self._prototype_vectors: tuple[list[str], np.ndarray] | None = None

    def _prototypes(self) -> tuple[list[str], np.ndarray]:
        if self._prototype_vectors is None:
            assert self.embedder is not None
            labels = [cat for cat, texts in _PROTOTYPES.items() for _ in texts]
            texts = [t for ts in _PROTOTYPES.values() for t in ts]
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

    def candidates(self, message: str) -> list[_Candidate]:
        """Pattern matches before classification (exposed for tests and debugging)."""
        if not _FIRST_PERSON.search(message):
            return []
        found = []
        for sentence, is_question in _sentences(message):
            if is_question:
                continue
            for clause in _clauses(sentence):
                candidate = _match_clause(clause)
                if candidate is not None:
                    found.append(candidate)
        return found

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
