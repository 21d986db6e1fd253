"""``EmbeddingCritic``: a model-free critic on MiniLM sentence embeddings and word counts.

The formulas and their ranges are in docs/critic.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np

from core.embeddings import Embedder
from learner.records import DIMENSIONS, CriticInput, Score

__all__ = ["EmbeddingCritic", "score_from_expected"]


def score_from_expected(expected: float) -> int:
    """The integer score of an expected value on 1..5 (halves round up)."""
    return int(min(5, max(1, np.floor(expected + 0.5))))


_PASSIVE_PHRASES = (
    "How can I help you today?",
    "How can I assist you?",
    "Is there anything else I can help you with?",
    "Let me know if you need anything.",
    "What can I do for you?",
    "I'm here to help with whatever you need.",
    "Feel free to ask me anything.",
    "That's interesting! Tell me more.",
    "Sounds great!",
    "I see. Please go on.",
)
_STOPWORD_TEXT = """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    really also maybe perhaps quite lot lots thing things something anything everything get got
    like well yes yeah oh great good nice sure let know tell think sounds sound today there's
    it's that's i'm you're what's don't can't help assist"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[a-zA-Z][a-zA-Z'-]+")
_SENTENCE = re.compile(r"(?<=[.!?;])\s+")


def _content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if len(w) > 2 and w.lower() not in _STOPWORDS}


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = [w.lower() for w in _WORD.findall(text)]
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(min(1.0, max(0.0, (x - lo) / (hi - lo))))


class EmbeddingCritic:
    """A model-free critic built on MiniLM sentence embeddings (see docs/critic.md)."""

    # Cosine ranges mapped linearly onto 0..1 (calibrated by eye on MiniLM; documented).
    REL_RANGE = (0.10, 0.50)
    INT_RANGE = (0.10, 0.55)
    PASSIVE_RANGE = (0.45, 0.75)
    REPEAT_RANGE = (0.70, 0.95)
    NOVEL_WORDS_FULL = 10

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.model_id = f"embedding:{embedder.model_id}"
        self.prompt_version = "embedding-v1"
        self._passive: np.ndarray | None = None

    def _passive_vectors(self) -> np.ndarray:
        if self._passive is None:
            self._passive = self.embedder.encode(list(_PASSIVE_PHRASES))
        return self._passive

    def score_batch(self, items: Sequence[CriticInput]) -> list[Score]:
        return [self._score_one(item) for item in items]

    def features(self, item: CriticInput) -> dict[str, float]:
        """The measured quantities every score is computed from."""
        bg_sentences = [s for s in _SENTENCE.split(item.background.strip()) if s]
        user_msgs = [c for r, c in item.history if r == "user" and c.strip()]
        bot_msgs = [c for r, c in item.history if r == "assistant" and c.strip()]
        texts = [item.reply, item.background, *bg_sentences, *user_msgs, *bot_msgs]
        vecs = self.embedder.encode(texts)
        reply, bg_full = vecs[0], vecs[1]
        n_bg = len(bg_sentences)
        bg_vecs = vecs[2 : 2 + n_bg]
        user_vecs = vecs[2 + n_bg : 2 + n_bg + len(user_msgs)]
        bot_vecs = vecs[2 + n_bg + len(user_msgs) :]
        sim_bg = 0.5 * float(reply @ bg_full) + 0.5 * float(np.max(bg_vecs @ reply) if n_bg else 0)
        sim_last = float(user_vecs[-1] @ reply) if len(user_msgs) else 0.0
        sim_topics = float(np.max(user_vecs @ reply)) if len(user_msgs) else 0.0
        passive = float(np.max(self._passive_vectors() @ reply))
        repeat_sem = float(np.max(bot_vecs @ reply)) if len(bot_msgs) else 0.0
        earlier = " ".join(c for _, c in item.history)
        reply_tri = _trigrams(item.reply)
        repeat_lex = len(reply_tri & _trigrams(earlier)) / len(reply_tri) if reply_tri else 0.0
        novel = len(_content_words(item.reply) - _content_words(earlier))
        return {
            "sim_background": sim_bg,
            "sim_last_user": sim_last,
            "sim_user_topics": sim_topics,
            "passive": passive,
            "repeat_semantic": repeat_sem,
            "repeat_lexical": repeat_lex,
            "novel_words": float(novel),
        }

    def _score_one(self, item: CriticInput) -> Score:
        f = self.features(item)
        passive_pen = _ramp(f["passive"], *self.PASSIVE_RANGE)
        repeat_pen = max(_ramp(f["repeat_semantic"], *self.REPEAT_RANGE), f["repeat_lexical"])
        keep = (1.0 - passive_pen) * (1.0 - repeat_pen)
        rel01 = _ramp(f["sim_background"], *self.REL_RANGE) * keep
        int01 = _ramp(0.6 * f["sim_last_user"] + 0.4 * f["sim_user_topics"], *self.INT_RANGE) * keep
        info01 = min(1.0, f["novel_words"] / self.NOVEL_WORDS_FULL)
        val01 = info01 * (0.5 + 0.5 * max(rel01, int01)) * keep
        expected = {"rel": 1 + 4 * rel01, "int": 1 + 4 * int01, "val": 1 + 4 * val01}
        ints = {d: score_from_expected(expected[d]) for d in DIMENSIONS}
        reasons = self._reasons(item, ints, passive_pen, repeat_pen, f)
        return Score(
            **ints,
            reasons=reasons,
            raw=json.dumps(f),
            critic_model_id=self.model_id,
            expected=expected,
        )

    @staticmethod
    def _reasons(
        item: CriticInput,
        ints: dict[str, int],
        passive_pen: float,
        repeat_pen: float,
        f: dict[str, float],
    ) -> dict[str, str]:
        notes = []
        if passive_pen > 0.3:
            notes.append("it reads like a stock offer of help rather than a real reply")
        if repeat_pen > 0.3:
            notes.append("it repeats what was already said earlier")
        extra = ("; " + "; ".join(notes)) if notes else ""
        last = item.last_user_message[:80]
        reasons = {
            "rel": (
                f"it connects to {item.user_name}'s background"
                if ints["rel"] >= 4
                else f"it does not connect to {item.user_name}'s work, history or interests" + extra
            ),
            "int": (
                f"it builds on what {item.user_name} said"
                if ints["int"] >= 4
                else f'it does not pick up what {item.user_name} just said ("{last}")' + extra
            ),
            "val": (
                f"it adds {int(f['novel_words'])} new specific points"
                if ints["val"] >= 4
                else f"it adds little new, specific information ({int(f['novel_words'])} new "
                "content words)" + extra
            ),
        }
        return reasons
