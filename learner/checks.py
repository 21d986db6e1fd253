"""Critic-free checks of a system's dialogues: what no critic score can hide.

A model trained against a critic can learn to please it (long, flattering, question-laden,
meta-talking replies) while getting worse as a chatbot. These checks need no critic: reply
flags from ``learner.reply_checks``, length, lexical diversity, perplexity under the base
model (given by the caller), what the simulated user disclosed when the bot asked, and the
simulated user's own failures (``learner.simulated_user.check_user_turn``).

``regressions`` compares a candidate's checks with the base's and names every check that got
worse by more than a relative tolerance, each in its own good direction (``CHECKS``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from core.embeddings import Embedder
from learner.metrics import PerplexityResult, ReplyContext, is_question
from learner.records import DialogueRecord, PersonaLike
from learner.reply_checks import ReplyFlags, check_reply, is_truncated, word_tokens
from learner.simulated_user import check_user_turn

__all__ = [
    "CHECKS",
    "RATE_FLOOR",
    "TRAIT_REVEAL_SIMILARITY",
    "CheckRegression",
    "CheckSpec",
    "CriticFreeChecks",
    "PerplexityFn",
    "critic_free_checks",
    "distinct_n",
    "history_before",
    "regressions",
    "reply_contexts",
    "traits_revealed",
]

log = logging.getLogger(__name__)

PerplexityFn = Callable[[Sequence[ReplyContext]], PerplexityResult]

# Cosine (MiniLM, unit vectors) at or above which a sentence the simulated user said counts
# as disclosing one sentence of its background. On Synthetic-Persona-Chat (300 validation
# conversations), 0.5 matches 48% of a speaker's persona facts with its own utterances and
# 6.7% with a stranger's; on shipped ISCO-800 backgrounds hand-written disclosures score
# 0.44-0.62 and unrelated sentences at most 0.20 (docs/evaluation.md). The same value as
# ``learner.metrics.DISCOVERY_SIMILARITY``.
TRAIT_REVEAL_SIMILARITY = 0.5
# Relative changes of a rate are taken against at least this base, so moving from 0 to 1
# flagged reply in 400 is a small change, not an infinite one.
RATE_FLOOR = 0.05
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n+")


@dataclass(frozen=True)
class CheckSpec:
    """How to read one check: its label, which way is better, and the floor of its base."""

    label: str
    better: str  # "lower" | "higher" | "" (reported, never a regression by itself)
    floor: float  # the smallest base used for the relative change


CHECKS: dict[str, CheckSpec] = {
    "perplexity": CheckSpec("perplexity under base", "lower", 1.0),
    "truncation_rate": CheckSpec("hit the token cap", "lower", RATE_FLOOR),
    "truncated_text_rate": CheckSpec("ends mid-sentence", "lower", RATE_FLOOR),
    "meta_rate": CheckSpec("meta-text", "lower", RATE_FLOOR),
    "placeholder_rate": CheckSpec("placeholders", "lower", RATE_FLOOR),
    "echo_rate": CheckSpec("copies the user", "lower", RATE_FLOOR),
    "role_flip_rate": CheckSpec("speaks as the user", "lower", RATE_FLOOR),
    "unusable_rate": CheckSpec("unusable replies", "lower", RATE_FLOOR),
    # Length alone is neither good nor bad: the method asks for short replies, so shorter
    # may be better, while its failure modes have their own checks (the cap and rambling
    # above; empty talk shows in distinct-2, traits revealed and the critics).
    "mean_words": CheckSpec("mean words per reply", "", 1.0),
    "distinct_2": CheckSpec("distinct-2", "higher", RATE_FLOOR),
    "traits_revealed": CheckSpec("traits revealed per dialogue", "higher", 0.25),
    "user_role_break_rate": CheckSpec("user breaks role", "lower", RATE_FLOOR),
    "user_placeholder_rate": CheckSpec("user placeholders", "lower", RATE_FLOOR),
}


@dataclass(frozen=True)
class CriticFreeChecks:
    """One system's critic-free checks over its dialogues (rates per reply or user turn)."""

    dialogues: int
    replies: int
    user_turns: int
    perplexity: PerplexityResult | None
    truncation_rate: float | None  # final_finish_reason == "length"
    truncated_text_rate: float | None  # the text stops mid-sentence (reply_checks)
    meta_rate: float | None
    placeholder_rate: float | None
    echo_rate: float | None
    role_flip_rate: float | None
    unusable_rate: float | None
    mean_words: float | None
    distinct_2: float | None
    traits_revealed: float | None  # mean per dialogue
    traits_revealed_share: float | None  # of the background's sentences, mean per dialogue
    user_role_break_rate: float | None
    user_placeholder_rate: float | None
    # Every ReplyFlags kind -> share of replies flagged.
    flag_rates: dict[str, float] = field(default_factory=dict)
    # Per dialogue (in input order): background sentences newly disclosed after a question.
    traits_per_dialogue: tuple[int, ...] = ()

    def value(self, key: str) -> float | None:
        """The number behind one ``CHECKS`` key."""
        if key not in CHECKS:
            raise KeyError(key)
        if key == "perplexity":
            return self.perplexity.perplexity if self.perplexity is not None else None
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.pop("traits_per_dialogue")
        data["perplexity"] = self.perplexity.to_dict() if self.perplexity is not None else None
        return data


@dataclass(frozen=True)
class CheckRegression:
    key: str
    label: str
    better: str
    base: float
    candidate: float
    relative_change: float  # (candidate - base) / max(|base|, floor); sign as measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.label}: {self.base:.4g} -> {self.candidate:.4g} "
            f"({100 * self.relative_change:+.1f}%, {self.better} is better)"
        )


def regressions(
    base: CriticFreeChecks, candidate: CriticFreeChecks, tolerance: float
) -> list[CheckRegression]:
    """Every check that got worse than ``base`` by more than ``tolerance`` (relative).

    Checks without a good direction (mean length) and checks missing on either side
    (e.g. perplexity not computed) are never named.
    """
    if tolerance < 0:
        raise ValueError("tolerance must be 0 or more")
    out = []
    for key, spec in CHECKS.items():
        if not spec.better:
            continue
        old, new = base.value(key), candidate.value(key)
        if old is None or new is None:
            continue
        change = (new - old) / max(abs(old), spec.floor)
        worse = change if spec.better == "lower" else -change
        if worse > tolerance:
            out.append(CheckRegression(key, spec.label, spec.better, old, new, change))
    return out


# ------------------------------------------------------------------------- helpers


def history_before(record: DialogueRecord, upto: int) -> list[tuple[str, str]]:
    """The chatbot's view before turn number ``upto`` of ``record.turns`` (0-based)."""
    history = [("assistant", record.greeting), ("user", record.user_intro)]
    for turn in record.turns[:upto]:
        history.append(("assistant", turn.final_reply))
        history.append(("user", turn.user_answer))
    return history


def reply_contexts(records: Sequence[DialogueRecord], system_prompt: str) -> list[ReplyContext]:
    """Every scored reply with what the chatbot saw before it (for perplexity)."""
    return [
        ReplyContext((("system", system_prompt), *history_before(record, i)), turn.final_reply)
        for record in records
        for i, turn in enumerate(record.turns)
    ]


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Distinct word n-grams over all n-grams of all texts (pooled); None without any."""
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        words = word_tokens(text)
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if len(s.strip()) > 1]


def traits_revealed(
    records: Sequence[DialogueRecord],
    backgrounds: Sequence[str],
    embedder: Embedder,
    *,
    threshold: float = TRAIT_REVEAL_SIMILARITY,
) -> list[tuple[int, int]]:
    """Per dialogue: (background sentences disclosed after a bot question, sentences).

    A background sentence is disclosed by a user turn when one of that turn's sentences has
    cosine >= ``threshold`` with it. It counts when it is *new* (no earlier user turn
    disclosed it) and the bot's message just before that user turn asked a question. The
    self-introduction marks what it discloses as known but never counts: the user was told
    to introduce itself, whatever the bot said.
    """
    if len(records) != len(backgrounds):
        raise ValueError("one background per dialogue")
    plans = []
    texts: list[str] = []
    for record, background in zip(records, backgrounds, strict=True):
        bg = _sentences(background)
        exchanges = [(record.greeting, record.user_intro, False)]
        exchanges += [(t.final_reply, t.user_answer, True) for t in record.turns if t.user_answer]
        said = [(_sentences(user), is_question(bot) and counts) for bot, user, counts in exchanges]
        plans.append((len(texts), bg, said))
        texts.extend(bg)
        for sents, _asked in said:
            texts.extend(sents)
    vectors = embedder.encode(texts) if texts else np.zeros((0, 1), dtype=np.float32)
    out = []
    for start, bg, said in plans:
        bg_vecs = vectors[start : start + len(bg)]
        cursor = start + len(bg)
        known: set[int] = set()
        revealed = 0
        for sents, asked in said:
            turn_vecs = vectors[cursor : cursor + len(sents)]
            cursor += len(sents)
            if not bg or not sents:
                continue
            best = (turn_vecs @ bg_vecs.T).max(axis=0)
            matched = {j for j in range(len(bg)) if best[j] >= threshold}
            if asked:
                revealed += len(matched - known)
            known |= matched
        out.append((revealed, len(bg)))
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _reply_flags(record: DialogueRecord, persona: PersonaLike) -> list[ReplyFlags]:
    return [
        check_reply(
            turn.final_reply,
            history=history_before(record, i),
            background=persona.background,
            user_name=persona.name,
            finish_reason=turn.final_finish_reason or None,
        )
        for i, turn in enumerate(record.turns)
    ]


def critic_free_checks(
    records: Sequence[DialogueRecord],
    personas: Sequence[PersonaLike] | Mapping[str, PersonaLike],
    *,
    embedder: Embedder | None = None,
    perplexity: PerplexityFn | None = None,
    system_prompt: str = "",
    threshold: float = TRAIT_REVEAL_SIMILARITY,
) -> CriticFreeChecks:
    """All checks over one system's dialogues.

    ``personas`` is either aligned with ``records`` (``personas[i]`` talked in
    ``records[i]``) or a mapping from persona id to persona.

    ``embedder`` (MiniLM) enables traits revealed; ``perplexity`` (e.g. ``reply_perplexity``
    bound to the base model's runner) receives every reply with its context, the context
    starting with ``system_prompt``.
    """
    if isinstance(personas, Mapping):
        personas = [personas[record.persona_id] for record in records]
    if len(records) != len(personas):
        raise ValueError("one persona per dialogue")
    flags: list[ReplyFlags] = []
    capped: list[float] = []
    text_cut: list[float] = []
    words: list[float] = []
    replies: list[str] = []
    user_flags = []
    for record, persona in zip(records, personas, strict=True):
        flags.extend(_reply_flags(record, persona))
        for turn in record.turns:
            capped.append(float(turn.final_finish_reason == "length"))
            text_cut.append(float(is_truncated(turn.final_reply)))
            words.append(float(len(turn.final_reply.split())))
            replies.append(turn.final_reply)
        user_texts = [record.user_intro, *(t.user_answer for t in record.turns)]
        user_flags.extend(
            check_user_turn(text, user_name=persona.name) for text in user_texts if text.strip()
        )
    kinds = [f.name for f in fields(ReplyFlags)]
    rates = {k: float(np.mean([getattr(f, k) for f in flags])) for k in kinds} if flags else {}
    traits: list[tuple[int, int]] = []
    if embedder is not None:
        traits = traits_revealed(
            records, [p.background for p in personas], embedder, threshold=threshold
        )
    ppl = None
    if perplexity is not None and replies:
        ppl = perplexity(reply_contexts(records, system_prompt))
        if ppl.perplexity is not None and not math.isfinite(ppl.perplexity):
            log.warning("perplexity is not finite: %s", ppl.perplexity)
    return CriticFreeChecks(
        dialogues=len(records),
        replies=len(replies),
        user_turns=len(user_flags),
        perplexity=ppl,
        truncation_rate=_mean(capped),
        truncated_text_rate=_mean(text_cut),
        meta_rate=rates.get("meta"),
        placeholder_rate=rates.get("placeholder"),
        echo_rate=rates.get("echo"),
        role_flip_rate=rates.get("role_flip"),
        unusable_rate=_mean([float(f.unusable) for f in flags]),
        mean_words=_mean(words),
        distinct_2=distinct_n(replies, 2),
        traits_revealed=_mean([float(n) for n, _ in traits]),
        traits_revealed_share=_mean([n / total for n, total in traits if total]),
        user_role_break_rate=_mean([float(f.role_break) for f in user_flags]),
        user_placeholder_rate=_mean([float(f.placeholder) for f in user_flags]),
        flag_rates=rates,
        traits_per_dialogue=tuple(n for n, _ in traits),
    )
