"""Text views for the poisoning guard: undo the tricks that hide a phrase from a pattern.

Every guard check runs on `views(text)`, never on the raw text. Each view is the text after:

1. NFKC (fullwidth and mathematical letters, ligatures, ``＃`` -> ``#``);
2. format characters (Unicode category Cf: zero-width space and joiners, soft hyphen,
   word joiner, bidi marks, tag characters) and a few blank letters removed, in one view,
   and turned into spaces in another (``Ignore<U+2060>previous`` has no other space);
3. combining marks dropped (``prevíous`` -> ``previous``, variation selectors);
4. Cyrillic, Greek and Armenian look-alikes mapped to the Latin letter they imitate, dashes
   and curly quotes to ASCII, then casefolded;
5. spacing collapsed: runs of blanks, and spaces inside chat-template tokens
   (``< | im_start | >`` -> ``<|im_start|>``, ``[ /INST ]``);
6. in further views, letter-spaced words joined (``i g n o r e``; not in every view, as
   ``u r a moron`` must keep its spaces), and leetspeak folded inside words that also hold a letter
   (``Ign0re`` -> ``ignore``, ``g@rbage`` -> ``garbage``), so plain numbers (``5/5``,
   ``relevance 5``) stay numbers. ``1`` may stand for ``i`` or ``l``: the reading that
   gives a word of the guard's own vocabulary wins, else ``i``.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable

__all__ = ["fold_leet", "normalise", "views"]

# Letters that render as nothing but are not Cf (Hangul fillers, braille blank).
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")

_LOOKALIKES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "о": "o", "р": "p", "с": "c",
        "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ԛ": "q",
        "ԝ": "w", "һ": "h", "ү": "y", "ӏ": "l", "м": "m", "н": "h", "т": "t",
        "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p",
        "С": "c", "Т": "t", "Х": "x", "Ѕ": "s", "І": "i", "Ј": "j", "У": "y", "Ү": "y",
        "Ԛ": "q", "Ԝ": "w", "Һ": "h", "Ӏ": "i",
        # Greek
        "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
        "υ": "u", "χ": "x", "ϲ": "c", "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h",
        "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n", "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y",
        "Χ": "x",
        # Armenian and Latin oddities
        "օ": "o", "ս": "u", "ı": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g", "ɩ": "i",
        # punctuation look-alikes
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-",
        "\u2015": "-", "\u2212": "-", "\u2018": "'", "\u2019": "'", "\u201b": "'",
        "\u02bc": "'", "\u201c": '"', "\u201d": '"',
    }
)  # fmt: skip

_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
_MAX_ONES = 4  # readings tried per word: 2 ** _MAX_ONES

_BLANKS = re.compile(r"[^\S\n]+")
_LETTER_SPACED = re.compile(r"\b(?:[a-z] ){2,}[a-z]\b")
_TEMPLATE = re.compile(r"<\s*\|\s*([^<>|\n]{1,40}?)\s*\|\s*>")
_INST = re.compile(r"\[\s*(/?)\s*inst\s*\]")
_WORD = re.compile(r"[a-z0-9@$]+")
_HAS_LETTER = re.compile(r"[a-z]")


def _strip_marks(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    return unicodedata.normalize("NFC", kept)


def _invisible(ch: str) -> bool:
    return unicodedata.category(ch) == "Cf" or ch in _BLANK_LETTERS


def _collapse(text: str) -> str:
    text = _BLANKS.sub(" ", text)
    text = _TEMPLATE.sub(lambda m: "<|" + re.sub(r"\s+", "", m.group(1)) + "|>", text)
    return _INST.sub(r"[\1inst]", text).strip()


def normalise(text: str, *, invisible_as_space: bool = False) -> str:
    """Steps 1-5 of the module doc (no letter joining, no leetspeak)."""
    text = unicodedata.normalize("NFKC", text)
    gap = " " if invisible_as_space else ""
    text = "".join(gap if _invisible(ch) else ch for ch in text)
    text = _strip_marks(text).translate(_LOOKALIKES).casefold()
    return _collapse(text)


def _join_letters(text: str) -> str:
    return _LETTER_SPACED.sub(lambda m: m.group(0).replace(" ", ""), text)


def _fold_word(word: str, vocabulary: frozenset[str]) -> str:
    if not _HAS_LETTER.search(word) or not any(c in _LEET or c == "1" for c in word):
        return word
    base = "".join(_LEET.get(c, c) for c in word)
    ones = [i for i, c in enumerate(base) if c == "1"]
    if not ones:
        return base
    if len(ones) <= _MAX_ONES:
        for letters in itertools.product("il", repeat=len(ones)):
            chars = list(base)
            for i, letter in zip(ones, letters, strict=True):
                chars[i] = letter
            reading = "".join(chars)
            if reading in vocabulary:
                return reading
    return base.replace("1", "i")


def fold_leet(text: str, vocabulary: frozenset[str] = frozenset()) -> str:
    """Leetspeak folded inside words that hold a letter; `text` is already normalised."""
    return _WORD.sub(lambda m: _fold_word(m.group(0), vocabulary), text)


def views(text: str, vocabulary: Iterable[str] = ()) -> tuple[str, ...]:
    """The distinct normalised views of `text` that every check runs on."""
    vocab = frozenset(vocabulary)
    out: list[str] = []
    for as_space in (False, True):
        plain = normalise(text, invisible_as_space=as_space)
        leet = fold_leet(plain, vocab)
        for view in (plain, leet, _join_letters(plain), _join_letters(leet)):
            if view not in out:
                out.append(view)
    return tuple(out)
