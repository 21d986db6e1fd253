"""PII scrubbing for shared exports.

Each match becomes a typed placeholder and is counted: `[EMAIL]`, `[URL]`, `[IBAN]`,
`[CARD]`, `[DOB]`, `[DATE]`, `[PHONE]`, the user's own names and memory facts (`[NAME]`,
`[FACT]`), then other people's full names (`[PERSON]`), in that order (so an e-mail wins
over the name inside it, a card over a phone number); placeholders are never matched again.
The detectors for cards, IBANs, dates and names are in `learner.pii_rules`, which says why
rules are used rather than a statistical recogniser.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from learner.pii_rules import Span, find_dates, find_financial, find_persons

__all__ = ["PII_KINDS", "PiiScrubber", "ScrubCounts", "UserTerms", "build_user_terms"]

PII_KINDS: tuple[str, ...] = (
    "email",
    "phone",
    "url",
    "card",
    "iban",
    "dob",
    "date",
    "person",
    "name",
    "fact",
)

_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
_TLDS = "com|org|net|io|dev|edu|gov|ai|app|info|co|uk|de|fr|es|it|nl|eu|me|ly|us|ca|au"
_URL = (
    r"(?:(?:https?|ftp)://|www\.)[^\s<>\"'`]+"
    r"|(?<![\w@.-])(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+(?i:" + _TLDS + r")"
    r"(?![\w-])(?:/[^\s<>\"'`]*)?"
)
# Loose on purpose; the digit count is checked in `_replace` (7..15 digits, not a date).
_PHONE = (
    r"(?<![\w+.,-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]?\d{2,5}){1,4}"
    r"(?!\w)(?![.,-]\d)"
)
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_RUN = re.compile(r"\d{13,}")  # an unbroken run this long is a timestamp or an id
_TRAILING = ".,;:!?)]}'\""
_WORD_SPLIT = re.compile(r"[^\w'’-]+|_")
_NAME_SPLIT = re.compile(r"[^A-Za-zÀ-ÖØ-öø-ɏ]+")

# Words never scrubbed as a name or fact term on their own (too common to be identifying).
_STOPWORD_TEXT = """a an the and or but of in on at to for from with by as is are was were be been am
    has have had do does did not no yes my your his her their our its it this that these those
    i me you he she we they them him who what which when where why how all any some very really
    just also into about over under after before than then there here out up down off so too
    lives live living works work working worked studied studies studying moved enjoys enjoy
    likes like loves love hates hate prefers prefer is was being has based originally named
    called favourite favorite years year old time free spare in their user admin anon guest
    test chat bot hello hi thanks"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_MIN_TERM_CHARS = 3


@dataclass
class ScrubCounts:
    email: int = 0
    phone: int = 0
    url: int = 0
    card: int = 0
    iban: int = 0
    dob: int = 0
    date: int = 0
    person: int = 0
    name: int = 0
    fact: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, kind) for kind in PII_KINDS)

    def add(self, kind: str, n: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + n)

    def merge(self, other: ScrubCounts) -> None:
        for kind in PII_KINDS:
            self.add(kind, getattr(other, kind))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class UserTerms:
    """The strings that identify one user: name forms and memory-fact terms (longest first)."""

    names: tuple[str, ...] = ()
    facts: tuple[str, ...] = ()


def _useful(term: str) -> bool:
    words = [w for w in _WORD_SPLIT.split(term.lower()) if w]
    return (
        len(term) >= _MIN_TERM_CHARS
        and bool(words)
        and not all(w in _STOPWORDS or len(w) < _MIN_TERM_CHARS for w in words)
    )


def _name_forms(name: str) -> set[str]:
    name = name.strip()
    parts = [p for p in _NAME_SPLIT.split(name) if p]
    forms = {name} if _useful(name) else set()
    forms.update(p for p in parts if _useful(p))
    if len(parts) > 1:
        forms.add(" ".join(parts))
    return forms


def _fact_terms(text: str) -> set[str]:
    text = re.sub(r"\s+", " ", text).strip().rstrip(".!?;,")
    terms = {text} if _useful(text) else set()
    words = text.split(" ")
    # The object of the fact: drop the leading predicate ("works as a", "lives in", ...).
    start = 0
    while start < len(words) and words[start].lower() in _STOPWORDS:
        start += 1
    obj = " ".join(words[start:])
    if obj and _useful(obj):
        terms.add(obj)
    # Proper-noun-like tokens anywhere in the fact ("Maya", "Lisbon", "Globex").
    for word in words:
        token = word.strip(_TRAILING + "(['’")
        if token[:1].isupper() and _useful(token):
            terms.add(token)
    return terms


def build_user_terms(
    username: str, fact_texts: Iterable[str], other_names: Iterable[str] = ()
) -> UserTerms:
    """Name forms of `username` (and `other_names`) plus the terms of the user's facts."""
    names: set[str] = set()
    for name in (username, *other_names):
        if name:
            names |= _name_forms(name)
    facts: set[str] = set()
    for text in fact_texts:
        if text:
            facts |= _fact_terms(text)
    facts -= names

    def order(items: set[str]) -> tuple[str, ...]:
        return tuple(sorted(items, key=lambda s: (-len(s), s.lower())))

    return UserTerms(names=order(names), facts=order(facts))


def _alternation(terms: tuple[str, ...]) -> str:
    return "|".join(re.escape(t).replace(r"\ ", r"\s+") for t in terms)


_LINKS = re.compile(f"(?P<email>{_EMAIL})|(?P<url>{_URL})")
_PHONES = re.compile(f"(?P<phone>{_PHONE})")
# Term boundaries also exclude brackets so a placeholder like "[NAME]" is never re-matched.
_TERM_START = r"(?<![\w\[])"
_TERM_END = r"(?![\w\]])"


def _compile(terms: UserTerms) -> re.Pattern[str] | None:
    parts = []
    if terms.facts:
        parts.append(f"(?P<fact>{_TERM_START}(?:{_alternation(terms.facts)}){_TERM_END})")
    if terms.names:
        parts.append(f"(?P<name>{_TERM_START}(?:{_alternation(terms.names)}){_TERM_END})")
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


class PiiScrubber:
    """Replaces PII in texts with typed placeholders and counts each replacement.

    Compiled per-user patterns are cached (bounded) because an export visits the same user
    across many conversations.
    """

    def __init__(self, *, cache_size: int = 4096) -> None:
        self._cache: OrderedDict[UserTerms, re.Pattern[str] | None] = OrderedDict()
        self._cache_size = cache_size

    def _pattern(self, terms: UserTerms) -> re.Pattern[str] | None:
        if terms in self._cache:
            self._cache.move_to_end(terms)
            return self._cache[terms]
        pattern = _compile(terms)
        self._cache[terms] = pattern
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return pattern

    def scrub(self, text: str, counts: ScrubCounts, terms: UserTerms | None = None) -> str:
        """Links, then numbers and dates, then phones, the user's terms, other people."""
        if not text:
            return text

        def replace(match: re.Match[str]) -> str:
            kind = match.lastgroup or ""
            value = match.group(0)
            tail = ""
            if kind == "phone":
                digits = sum(c.isdigit() for c in value)
                if not 7 <= digits <= 15 or _DATE.fullmatch(value) or _RUN.fullmatch(value):
                    return value
            elif kind == "url":
                stripped = value.rstrip(_TRAILING)
                tail = value[len(stripped) :]
            counts.add(kind)
            return f"[{kind.upper()}]{tail}"

        text = _LINKS.sub(replace, text)
        text = _replace_spans(text, find_financial(text), counts)
        text = _replace_spans(text, find_dates(text), counts)
        text = _PHONES.sub(replace, text)
        pattern = self._pattern(terms) if terms is not None else None
        if pattern is not None:
            text = pattern.sub(replace, text)
        return _replace_spans(text, find_persons(text), counts)


def _replace_spans(text: str, spans: list[Span], counts: ScrubCounts) -> str:
    out, at = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < at:
            continue  # overlaps one already replaced
        out += [text[at : span.start], f"[{span.kind.upper()}]"]
        counts.add(span.kind)
        at = span.end
    out.append(text[at:])
    return "".join(out)
