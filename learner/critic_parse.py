"""A tolerant parser for the answers LLM judges really give.

It accepts the requested ``rel: 4 because ...`` lines and the common variants judges drift
into (full dimension names, markdown bold, ``4/5``, ``4 out of 5``, a single line
``Rel 4, Int 3, Val 2``, JSON objects, fenced JSON). It never invents a score: anything
not a whole number from 1 to 5 for every dimension is a parse failure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from learner.records import DIMENSIONS

__all__ = ["ParseResult", "parse_judgement"]

_ALIASES = {
    "rel": "rel",
    "relevance": "rel",
    "relevancy": "rel",
    "int": "int",
    "interest": "int",
    "interesting": "int",
    "interestingness": "int",
    "engagement": "int",
    "val": "val",
    "value": "val",
    "valuable": "val",
    "usefulness": "val",
}
_KEY_RE = "|".join(sorted(_ALIASES, key=len, reverse=True))
# A dimension key must open a line or follow punctuation, so words like "interest" inside a
# reason are not taken for keys.
_SCORE_RE = re.compile(
    r"(?:^|(?<=[\n,;|{(\[*#\"'\-]))[ \t]*(?:\d[.)][ \t]*)?[*_\"'#\-\s]*"
    rf"(?P<key>{_KEY_RE})\b"
    r"(?P<mid>[^\n:=\d]{0,40}?)[*_\"']*\s*[:=]?\s*[*_\"']*\s*"
    r"(?P<score>-?\d+(?:\.\d+)?)(?![\w])"
    r"(?:\s*(?:/|out\s+of)\s*(?P<den>\d+))?",
    re.IGNORECASE | re.MULTILINE,
)
_REASON_STRIP = " \t\n-–—:;,.()[]*_\"'|"


@dataclass
class ParseResult:
    scores: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(d in self.scores for d in DIMENSIONS)


def _to_score(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[1-5]\s*(?:/\s*5)?\s*", value):
        number = int(value.strip()[0])
    else:
        return None
    return number if 1 <= number <= 5 else None


def _clean_reason(text: str) -> str:
    text = text.strip(_REASON_STRIP)
    text = re.sub(r"^(?:because|since|as)\b\s*", "", text, flags=re.IGNORECASE)
    return " ".join(text.split()).strip(_REASON_STRIP)


def _parse_json(text: str) -> ParseResult | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start : end + 1])
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("scores"), dict):
        reasons_in = data.get("reasons") if isinstance(data.get("reasons"), dict) else {}
        data = {**data["scores"], **{f"{k}_reason": v for k, v in reasons_in.items()}}
    result = ParseResult()
    for key, value in data.items():
        dim = _ALIASES.get(str(key).strip().lower())
        if dim is None:
            continue
        if isinstance(value, dict):
            raw_score = value.get("score", value.get("value"))
            reason = value.get("reason") or value.get("because") or ""
        else:
            raw_score = value
            reason = data.get(f"{key}_reason") or data.get(f"{dim}_reason") or ""
        score = _to_score(raw_score)
        if score is None:
            result.error = f"{dim}: {raw_score!r} is not a whole number from 1 to 5"
            return result
        result.scores[dim] = score
        result.reasons[dim] = _clean_reason(str(reason))
    if not result.scores:
        return None
    missing = [d for d in DIMENSIONS if d not in result.scores]
    if missing:
        result.error = f"missing {', '.join(missing)}"
    return result


def parse_judgement(text: str) -> ParseResult:
    """Parse a judge's answer into three 1-5 scores with reasons, or say why it can't."""
    if not text or not text.strip():
        return ParseResult(error="empty answer")
    from_json = _parse_json(text)
    if from_json is not None and from_json.ok:
        return from_json
    matches = list(_SCORE_RE.finditer(text))
    result = ParseResult()
    for i, match in enumerate(matches):
        dim = _ALIASES[match.group("key").lower()]
        if dim in result.scores:
            continue  # the first mention of a dimension is its score
        den = match.group("den")
        raw = match.group("score")
        if den is not None and den != "5":
            result.error = f"{dim}: score on a scale of {den}, not 5"
            return result
        score = _to_score(float(raw)) if "." in raw else _to_score(int(raw))
        if score is None:
            result.error = f"{dim}: {raw!r} is not a whole number from 1 to 5"
            return result
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        result.scores[dim] = score
        result.reasons[dim] = _clean_reason(text[match.end() : end])
    missing = [d for d in DIMENSIONS if d not in result.scores]
    if missing:
        result.error = f"missing {', '.join(missing)}"
    return result
