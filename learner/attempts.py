"""Attempt texts: cleaning, trimming a capped reply, picking the best attempt, and the
critique-guided regeneration request of Algorithm 1."""

from __future__ import annotations

import re

from core.prompting import load_prompt
from core.types import Completion
from learner.records import Score, TurnRecord

__all__ = ["clean_text", "finished_text", "is_apology", "keep_best", "regeneration_request"]

_APOLOGY = re.compile(
    r"^\W*(?:i(?:'m|\s+am)\s+(?:so\s+|very\s+|really\s+|truly\s+)?sorry|sorry|my\s+apolog|"
    r"i\s+apologi[sz]e|apologies)",
    re.IGNORECASE,
)
# C0 control characters (not tab/newline) that a small model may emit: never keep them.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?=\s|$)")


def clean_text(text: str) -> str:
    return _CONTROL.sub("", text).strip()


def finished_text(completion: Completion) -> tuple[str, str]:
    """The reply text and why it stopped; a reply cut at the token cap ends at its last
    whole sentence when there is one (the cap is still recorded as its finish reason)."""
    text = clean_text(completion.text)
    if completion.finish_reason == "length":
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends and ends[-1] >= 0.4 * len(text):
            text = text[: ends[-1]].strip()
    return text, completion.finish_reason


def keep_best(turn: TurnRecord) -> None:
    """The final reply is the best-scoring usable attempt (the earliest on a tie)."""
    usable = [a for a in turn.attempts if a.usable and a.score.mean() is not None]
    if not usable:
        return
    best = max(usable, key=lambda a: (a.score.mean(), -turn.attempts.index(a)))
    turn.final_reply, turn.final_score = best.reply, best.score
    turn.final_finish_reason = best.finish_reason


def is_apology(text: str) -> bool:
    return bool(_APOLOGY.match(text))


def regeneration_request(score: Score, threshold: int, last_user_message: str) -> str:
    """The feedback message listing, per failing dimension, the critic's reason."""
    names = {"rel": "relevance to them", "int": "their interest", "val": "value"}
    problems = "\n".join(
        f"- {names[d]} ({score.get(d)}/5): {score.reasons.get(d) or 'too low'}"
        for d in score.failing(threshold)
    )
    return load_prompt("regenerate", "learner").fill(
        problems=problems, last_user_message=last_user_message
    )
