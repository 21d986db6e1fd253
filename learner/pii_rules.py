"""Rule-based detectors for the export scrubber: cards, IBANs, dates, other people's names.

Each detector returns `Span`s; `learner.pii` replaces them with typed placeholders.

- **card**: 13-19 digits (spaces or dashes allowed), a payment network's first digit (2-6)
  and a valid Luhn check digit, so order numbers and ISBNs mostly pass untouched.
- **iban**: country letters, two check digits and 11-30 letters or digits (groups of four
  may be spaced), kept only when the ISO 13616 mod-97 check holds.
- **dob**: a date near a birth word ("born", "birthday", "DOB", "date of birth", "b."),
  including a bare month and year or year ("born in 1972").
- **date**: any other full calendar date (day, month and year). Like HIPAA's Safe Harbor
  rule we drop every full date tied to a person and keep years, months and times: a date
  seldom matters to training data and can single a person out.
- **person**: a full name of someone in the conversation: a title and a capitalised name
  ("Dr. Priya Raman", "Mr Patel"); a known given name (``data/given_names.txt``) and a
  capitalised surname ("John Miller", "Peter van der Berg"); or two capitalised words after
  a relation word or "named" ("my landlord Jo Bloggs"). The user's own names are replaced
  before this, as ``[NAME]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["Span", "find_dates", "find_financial", "find_persons", "iban_valid", "luhn_valid"]


@dataclass(frozen=True)
class Span:
    kind: str
    start: int
    end: int


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    compact = re.sub(r"\s+", "", text).upper()
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


_CARD = re.compile(r"(?<![\w.,/+-])\d(?:[ -]?\d){12,18}(?![\w/-]|[.,]\d)")
_IBAN = re.compile(r"(?<![\w-])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,4})?\b")


def _card(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _iban_end(text: str, start: int, end: int) -> int | None:
    """The end of the longest valid IBAN in text[start:end], dropping trailing groups (the
    regex may have taken a following word of four letters, as in "... 1332 asap")."""
    while end - start >= 15:
        if iban_valid(text[start:end]):
            return end
        cut = text.rfind(" ", start, end)
        if cut <= start:
            return None
        end = cut
    return None


def find_financial(text: str) -> list[Span]:
    spans = []
    for m in _IBAN.finditer(text):
        end = _iban_end(text, m.start(), m.end())
        if end is not None:
            spans.append(Span("iban", m.start(), end))
    for m in _CARD.finditer(text):
        if _card(m) and not any(s.start <= m.start() < s.end for s in spans):
            spans.append(Span("card", m.start(), m.end()))
    return spans


_MONTHS = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
    r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[89]\d\d|20\d\d)"
_FULL_DATE = (
    rf"{_YEAR}[-./](?:0?[1-9]|1[0-2])[-./](?:[12]\d|3[01]|0?[1-9])"
    rf"|(?:[12]\d|3[01]|0?[1-9])[-./](?:[12]\d|3[01]|0?[1-9])[-./](?:{_YEAR}|\d\d)"
    rf"|{_DAY}(?: of)? {_MONTHS},? {_YEAR}"
    rf"|{_MONTHS} {_DAY},? {_YEAR}"
)
_PARTIAL_DATE = rf"{_MONTHS},? {_YEAR}|{_YEAR}"
_EDGE_START, _EDGE_END = r"(?<![\w./-])", r"(?![\w/]|[-.]\d)"
_DATES = re.compile(
    rf"{_EDGE_START}(?:(?P<full>{_FULL_DATE})|(?P<partial>{_PARTIAL_DATE})){_EDGE_END}",
    re.IGNORECASE,
)
_BIRTH = re.compile(r"\b(?:born|birth\w*|b\.|dob|d\.o\.b\.?|date of birth)(?=\W)", re.IGNORECASE)
_BIRTH_REACH = 40  # characters between a birth word and its date
_SENTENCE_END = re.compile(r"[.!?;]\s")


def _after_birth_word(text: str, start: int, births: list[int]) -> bool:
    """A birth word ends shortly before `start`, in the same sentence."""
    return any(
        0 <= start - b <= _BIRTH_REACH and not _SENTENCE_END.search(text, b, start) for b in births
    )


def find_dates(text: str) -> list[Span]:
    births = [m.end() for m in _BIRTH.finditer(text)]
    spans = []
    for m in _DATES.finditer(text):
        if _after_birth_word(text, m.start(), births):
            spans.append(Span("dob", m.start(), m.end()))
        elif m.group("full"):
            spans.append(Span("date", m.start(), m.end()))
    return spans


_TITLE = r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Dame)\.?"
_CAP = r"(?:[A-Z][a-zà-öø-ÿ]+(?:['’][A-Z][a-zà-öø-ÿ]+)?|O['’][A-Z][a-zà-öø-ÿ]+|Mc[A-Z][a-z]+)"
_SURNAME = rf"(?:(?:Al|El|Ben|Abu)-)?{_CAP}(?:-{_CAP})?"
_PARTICLE = r"(?:van|von|der|den|de|da|di|del|la|le|bin|ibn)"
_FULL = rf"{_CAP}(?:-{_CAP})?(?: {_CAP})?(?: {_PARTICLE})* {_SURNAME}"
_RELATION = (
    r"\b(?:friend|colleague|boss|manager|sister|brother|mother|father|mum|mom|dad|son|"
    r"daughter|wife|husband|partner|girlfriend|boyfriend|ex|neighbou?r|landlord|landlady|"
    r"teacher|doctor|therapist|cousin|aunt|uncle|niece|nephew|coworker|roommate|flatmate)"
    r",? |\b(?:named|called) "
)
_PERSON_TITLE = re.compile(rf"\b{_TITLE} {_CAP}(?: {_CAP})?(?: {_PARTICLE})*(?: {_SURNAME})?")
_PERSON_NAME = re.compile(rf"(?<![\w-])(?P<full>{_FULL})(?![\w-])")
_PERSON_RELATION = re.compile(rf"(?:{_RELATION})(?P<full>{_CAP} {_SURNAME})(?![\w-])")
# A last word naming a kind of place or thing makes a place, not a person.
_NOT_SURNAME_TEXT = """street road avenue lane park square station river lake mountain mount bay beach
    university college school academy hospital clinic airport church cathedral hall center
    centre tower bridge island valley street day eve night week month year city town county
    state republic kingdom tech institute museum gallery club team group company bank"""
_NOT_SURNAMES = frozenset(_NOT_SURNAME_TEXT.split())


@cache
def _given_names() -> frozenset[str]:
    text = resources.files("learner").joinpath("data/given_names.txt").read_text("utf-8")
    return frozenset(
        word.casefold()
        for line in text.splitlines()
        if not line.startswith("#")
        for word in line.split()
    )


def _plausible(full: str, *, need_given: bool) -> bool:
    words = full.replace("-", " ").split()
    if words[-1].casefold() in _NOT_SURNAMES:
        return False
    return not need_given or words[0].casefold() in _given_names()


def find_persons(text: str) -> list[Span]:
    spans: list[Span] = []

    def add(start: int, end: int) -> None:
        if not any(s.start < end and start < s.end for s in spans):
            spans.append(Span("person", start, end))

    for m in _PERSON_TITLE.finditer(text):
        add(m.start(), m.end())
    for m in _PERSON_RELATION.finditer(text):
        if _plausible(m.group("full"), need_given=False):
            add(m.start("full"), m.end("full"))
    at = 0
    while (m := _PERSON_NAME.search(text, at)) is not None:
        if _plausible(m.group("full"), need_given=True):
            add(m.start("full"), m.end("full"))
            at = m.end()
        else:  # "Tell Mohammed Al-Farsi": try again from the next word
            at = m.start() + len(m.group("full").split(" ", 1)[0]) + 1
    return spans
