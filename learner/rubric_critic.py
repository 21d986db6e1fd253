"""The rubric critic: the default offline training critic (MiniLM + model-free reply checks).

It judges a reply as the user would: relevance to what they have told the chatbot (and to
their background, without credit for details they never said), interest (picking up their
last message and moving it on) and value (new, specific content in well-formed sentences).
Every gaming pattern of ``learner.reply_checks`` is penalised. Raw 0..1 composites are mapped
onto 1..5 through anchors taken from percentiles of real base-model replies
(``learner/data/rubric_calibration.json``); formulas and figures are in docs/critic.md.

Recalibrate (after changing a feature or a weight) with
``python -m learner.critic_tools_cli calibrate-rubric [--replies FILE] [--target-pass 0.25]``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from core.embeddings import Embedder
from learner.records import DIMENSIONS, CriticInput, Score
from learner.reply_checks import (
    ReplyFlags,
    check_reply,
    content_stems,
    unrevealed_details,
    word_tokens,
)

__all__ = [
    "Calibration",
    "RubricCritic",
    "RubricFeatures",
    "calibrate",
    "load_calibration",
    "load_reply_items",
]

log = logging.getLogger(__name__)

FEATURES_VERSION = "rubric-v1"
CALIBRATION_FILE = "rubric_calibration.json"
REPLIES_FILE = "rubric_calibration_replies.jsonl"
# Base-reply percentiles that anchor the 1..5 scale; "pass" is solved for a target pass rate.
# A composite of 0 scores 1 and the best possible composite (1) scores 5.
ANCHOR_PERCENTILES = {"mid": 50.0, "top": 97.0}
ANCHOR_SCORES = {"zero": 1.0, "mid": 2.75, "pass": 3.5, "top": 4.5, "max": 5.0}
# Unusable replies (cut off, meta-talk, template slots, speaking as the user) never pass.
UNUSABLE_CAP = 1.75
UNUSABLE_FLAGS = frozenset({"truncated", "meta", "placeholder", "role_flip"})
# Multipliers of the raw rel / int / val composites for each flag.
PENALTIES: dict[str, tuple[float, float, float]] = {
    "truncated": (0.6, 0.5, 0.3),
    "meta": (0.5, 0.4, 0.3),
    "placeholder": (0.6, 0.5, 0.3),
    "role_flip": (0.4, 0.3, 0.3),
    "echo": (0.8, 0.35, 0.3),
    "keyword_list": (0.7, 0.4, 0.1),
    "passive": (0.3, 0.25, 0.2),
    "ramble": (0.8, 0.55, 0.45),
    "recites_unrevealed": (0.35, 0.5, 0.6),
}


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(min(1.0, max(0.0, (x - lo) / (hi - lo))))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = word_tokens(text)
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def _quote(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


@dataclass
class RubricFeatures:
    """What one reply's scores are computed from (kept as the Score's raw JSON)."""

    sim_last: float = 0.0  # cosine to the user's last message
    sim_user: float = 0.0  # best cosine to any user message
    sim_background: float = 0.0  # 0.5 whole background + 0.5 best background sentence
    sim_revealed: float = 0.0  # best background sentence, weighted by how much was revealed
    sim_repeat: float = 0.0  # best cosine to an earlier chatbot turn
    repeat_lexical: float = 0.0  # share of the reply's trigrams already in the dialogue
    novel: int = 0  # content stems of the reply not in the dialogue
    words: int = 0
    sentences: int = 0
    questions: int = 0
    unrevealed: list[str] = field(default_factory=list)
    matched_user: str = ""  # the user message the reply is closest to
    flags: list[str] = field(default_factory=list)
    composite: dict[str, float] = field(default_factory=dict)  # penalised raw 0..1


@dataclass(frozen=True)
class Calibration:
    """Raw-composite anchors per dimension (x ascending), frozen in a versioned JSON file."""

    version: str
    anchors: dict[str, list[tuple[float, float]]]
    pass_percentile: float
    base_pass_rate: float
    base_means: dict[str, float]
    replies: int
    source: str = ""
    created: str = ""

    def map(self, dim: str, x: float) -> float:
        xs, ys = zip(*self.anchors[dim], strict=True)
        return float(np.clip(np.interp(x, xs, ys), 1.0, 5.0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        anchors = {d: [(float(x), float(y)) for x, y in data["anchors"][d]] for d in DIMENSIONS}
        return cls(**{**data, "anchors": anchors})


def load_calibration(path: Path | None = None) -> Calibration:
    if path is None:
        text = resources.files("learner").joinpath("data", CALIBRATION_FILE).read_text("utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return Calibration.from_dict(json.loads(text))


def _identity_calibration() -> Calibration:
    """0..1 mapped linearly onto 1..5: only used while producing a calibration."""
    line = [(0.0, 1.0), (1.0, 5.0)]
    return Calibration("uncalibrated", dict.fromkeys(DIMENSIONS, line), 0.0, 0.0, {}, 0)


class RubricCritic:
    """MiniLM similarities + reply checks, calibrated on base-model replies (docs/critic.md)."""

    def __init__(self, embedder: Embedder, calibration: Calibration | None = None):
        self.embedder = embedder
        self.calibration = calibration if calibration is not None else load_calibration()
        cal = self.calibration.version
        self.model_id = f"rubric:{embedder.model_id}:{cal}"
        self.prompt_version = f"{FEATURES_VERSION}+{cal}"

    # ------------------------------------------------------------------ features
    def features_batch(self, items: Sequence[CriticInput]) -> list[RubricFeatures]:
        """Features of every item; all texts go through one ``encode`` call."""
        texts: dict[str, int] = {}

        def ref(text: str) -> int:
            return texts.setdefault(text, len(texts))

        plans = []
        for item in items:
            bg_sents = _sentences(item.background)
            users = [c for r, c in item.history if r == "user" and c.strip()]
            bots = [c for r, c in item.history if r == "assistant" and c.strip()]
            plans.append(
                (
                    ref(item.reply),
                    ref(item.background) if item.background.strip() else None,
                    [ref(s) for s in bg_sents],
                    [ref(u) for u in users],
                    [ref(b) for b in bots],
                )
            )
        vecs = self.embedder.encode(list(texts)) if texts else np.zeros((0, 384), np.float32)
        return [self._features(item, vecs, *plan) for item, plan in zip(items, plans, strict=True)]

    def _features(
        self,
        item: CriticInput,
        vecs: np.ndarray,
        reply_i: int,
        bg_i: int | None,
        bg_is: list[int],
        user_is: list[int],
        bot_is: list[int],
    ) -> RubricFeatures:
        r = vecs[reply_i]
        f = RubricFeatures()
        users = [c for role, c in item.history if role == "user" and c.strip()]
        if user_is:
            sims = vecs[user_is] @ r
            f.sim_last = float(sims[-1])
            f.sim_user = float(sims.max())
            f.matched_user = users[int(sims.argmax())]
        if bg_is:
            bg_sims = vecs[bg_is] @ r
            whole = float(vecs[bg_i] @ r) if bg_i is not None else float(bg_sims.max())
            f.sim_background = 0.5 * whole + 0.5 * float(bg_sims.max())
            if user_is:
                # How much of each background sentence the user has already said.
                revealed = (vecs[bg_is] @ vecs[user_is].T).max(axis=1)
                weight = np.clip((revealed - 0.15) / 0.35, 0.0, 1.0)
                f.sim_revealed = float((bg_sims * weight).max())
        if bot_is:
            f.sim_repeat = float((vecs[bot_is] @ r).max())
        earlier = "\n".join(c for _, c in item.history)
        tri = _trigrams(item.reply)
        f.repeat_lexical = len(tri & _trigrams(earlier)) / len(tri) if tri else 0.0
        f.novel = len(content_stems(item.reply) - content_stems(earlier))
        f.words = len(word_tokens(item.reply))
        f.sentences = len(_sentences(item.reply))
        f.questions = item.reply.count("?")
        f.unrevealed, _ = unrevealed_details(
            item.reply, item.background, "\n".join(users), item.user_name
        )
        flags = check_reply(
            item.reply, history=item.history, background=item.background, user_name=item.user_name
        )
        f.flags = list(flags.kinds())
        f.composite = self._composite(f, flags)
        return f

    @staticmethod
    def _composite(f: RubricFeatures, flags: ReplyFlags) -> dict[str, float]:
        """Raw 0..1 rel / int / val before calibration (formulas in docs/critic.md)."""
        follow = _ramp(f.sim_user, 0.10, 0.50)
        background = max(
            _ramp(f.sim_revealed, 0.10, 0.45), 0.8 * _ramp(f.sim_background, 0.10, 0.45)
        )
        topical = max(follow, background)
        pick = max(_ramp(f.sim_last, 0.05, 0.45), 0.7 * follow)
        # Saturating counts of new content words: more specifics always help a little.
        specific = 1.0 - np.exp(-f.novel / 8.0)
        question = 1.0 if 1 <= f.questions <= 2 else 0.0
        size = _ramp(f.words, 3, 12) * (1.0 - 0.5 * _ramp(f.words, 60, 110))
        repeat = max(_ramp(f.sim_repeat, 0.70, 0.95), _ramp(f.repeat_lexical, 0.2, 0.8))
        # Close to the user's last message with little of its own: a restatement, even
        # where the words differ (the lexical echo check misses synonyms).
        restate = _ramp(f.sim_last, 0.60, 0.90) * (1.0 - _ramp(f.novel, 4, 12))
        raw = [
            topical * (0.8 + 0.2 * specific) * (1.0 - 0.7 * repeat),
            pick
            * (0.45 + 0.35 * specific + 0.2 * question)
            * (1.0 - repeat)
            * (1.0 - 0.6 * restate),
            specific
            * size
            * (0.25 + 0.75 * max(topical, pick))
            * (1.0 - repeat)
            * (1.0 - 0.5 * restate),
        ]
        for kind in flags.kinds():
            raw = [x * m for x, m in zip(raw, PENALTIES[kind], strict=True)]
        return dict(zip(DIMENSIONS, (float(x) for x in raw), strict=True))

    # ------------------------------------------------------------------- scoring
    def score_batch(self, items: Sequence[CriticInput]) -> list[Score]:
        if not items:
            return []
        return [
            self._score(item, f) for item, f in zip(items, self.features_batch(items), strict=True)
        ]

    def _score(self, item: CriticInput, f: RubricFeatures) -> Score:
        unusable = bool(UNUSABLE_FLAGS & set(f.flags))
        expected = {}
        for dim in DIMENSIONS:
            value = self.calibration.map(dim, f.composite[dim])
            expected[dim] = min(value, UNUSABLE_CAP) if unusable else value
        ints = {d: int(min(5, max(1, np.floor(expected[d] + 0.5)))) for d in DIMENSIONS}
        raw = {**asdict(f), "expected": expected, "calibration": self.calibration.version}
        return Score(
            **ints,
            reasons=_reasons(item, f, ints),
            raw=json.dumps(raw),
            critic_model_id=self.model_id,
            expected=expected,
        )


# ----------------------------------------------------------------------- reasons
_FLAG_NOTES = {
    "truncated": "it is cut off mid-sentence",
    "meta": "it talks about its own reply or instructions instead of talking to the user",
    "placeholder": "it contains unfilled template slots",
    "role_flip": "it speaks as the user or writes speaker labels",
    "echo": "it repeats the user's own words without adding anything",
    "keyword_list": "it is a list of keywords, not sentences",
    "passive": "it is a stock offer of help instead of a reply",
    "ramble": "it is too long and wanders over many topics",
}


def _reasons(item: CriticInput, f: RubricFeatures, ints: dict[str, int]) -> dict[str, str]:
    name = item.user_name or "the user"
    notes = [_FLAG_NOTES[k] for k in f.flags if k in _FLAG_NOTES]
    if "recites_unrevealed" in f.flags:
        notes.append(f"it names details {name} never mentioned ({', '.join(f.unrevealed[:4])})")
    if f.sim_repeat >= 0.8 or f.repeat_lexical >= 0.4:
        notes.append("it repeats an earlier chatbot turn")
    extra = "; ".join(notes)
    last = _quote(item.last_user_message)
    if ints["rel"] >= 4:
        rel = f'it connects to what {name} said ("{_quote(f.matched_user)}")'
    elif f.matched_user:
        rel = (
            f'it is only loosely tied to what {name} has said (closest: "{_quote(f.matched_user)}")'
        )
    else:
        rel = f"it is only loosely tied to {name}'s situation"
    if ints["int"] >= 4:
        asks = " and asks about it" if 1 <= f.questions <= 2 else ""
        intr = f'it picks up {name}\'s last message ("{last}") and takes it further{asks}'
    elif f.sim_last < 0.3:
        intr = f'it does not pick up {name}\'s last message ("{last}")'
    else:
        intr = f'it touches {name}\'s last message ("{last}") but adds little to it'
    if ints["val"] >= 4:
        val = f"it brings {f.novel} new specific words in {f.sentences} well-formed sentence(s)"
    else:
        val = f"it carries little new substance ({f.novel} new content words)"
    reasons = {"rel": rel, "int": intr, "val": val}
    if extra:
        reasons = {d: (r if ints[d] >= 4 else f"{r}; {extra}") for d, r in reasons.items()}
    return reasons


# ------------------------------------------------------------------- calibration
def load_reply_items(path: Path | None = None) -> list[CriticInput]:
    """Base-model replies (JSONL: name, background, history, reply) as critic inputs."""
    if path is None:
        text = resources.files("learner").joinpath("data", REPLIES_FILE).read_text("utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    items = []
    for line in text.splitlines():
        if line.strip():
            raw = json.loads(line)
            history = tuple((r, c) for r, c in raw["history"])
            items.append(CriticInput(raw["name"], raw["background"], history, raw["reply"]))
    return items


MIN_ANCHOR_GAP = 0.02  # keeps the anchors strictly increasing where base replies tie


def _mapped(cal: Calibration, arr: np.ndarray, unusable: np.ndarray) -> np.ndarray:
    mapped = np.array([[cal.map(d, row[j]) for j, d in enumerate(DIMENSIONS)] for row in arr])
    mapped[unusable] = np.minimum(mapped[unusable], UNUSABLE_CAP)
    return mapped


def calibrate(
    composites: Sequence[dict[str, float]],
    *,
    version: str,
    unusable: Sequence[bool] | None = None,
    target_pass: float = 0.25,
    out: Path | None = None,
    source: str = "",
) -> Calibration:
    """Anchors from percentiles of base-model raw composites; writes ``out`` if given.

    Percentiles are taken over the usable replies (unusable ones are capped by the critic
    and never pass). The "pass" anchor (score 3.5, which rounds to 4) is the one percentile,
    shared by the three dimensions, at which ``target_pass`` of all base replies pass.
    """
    arr = np.array([[c[d] for d in DIMENSIONS] for c in composites], dtype=np.float64)
    bad = np.zeros(len(arr), bool) if unusable is None else np.array(unusable, bool)
    usable = arr[~bad] if (~bad).any() else arr

    def anchors_at(pass_p: float) -> dict[str, list[tuple[float, float]]]:
        percentiles = [ANCHOR_PERCENTILES["mid"], pass_p, ANCHOR_PERCENTILES["top"]]
        scores = [ANCHOR_SCORES[k] for k in ("zero", "mid", "pass", "top", "max")]
        out_anchors = {}
        for j, dim in enumerate(DIMENSIONS):
            xs = [0.0, *(float(np.percentile(usable[:, j], p)) for p in percentiles), 1.0]
            for k in range(1, len(xs)):  # strictly increasing, so interpolation is defined
                xs[k] = max(xs[k], xs[k - 1] + MIN_ANCHOR_GAP)
            out_anchors[dim] = [(round(x, 5), y) for x, y in zip(xs, scores, strict=True)]
        return out_anchors

    def pass_rate(cal: Calibration) -> float:
        rounded = np.floor(_mapped(cal, arr, bad) + 0.5)
        return float(np.mean(np.all(rounded >= 4, axis=1)))

    lo_p, hi_p = ANCHOR_PERCENTILES["mid"] + 1.0, ANCHOR_PERCENTILES["top"] - 1.0
    for _ in range(30):  # bisection: a higher pass percentile passes fewer replies
        p = 0.5 * (lo_p + hi_p)
        rate = pass_rate(Calibration(version, anchors_at(p), p, 0.0, {}, len(arr)))
        lo_p, hi_p = (p, hi_p) if rate > target_pass else (lo_p, p)
    pass_p = round(hi_p, 3)
    anchors = anchors_at(pass_p)
    draft = Calibration(version, anchors, pass_p, 0.0, {}, len(arr))
    mapped = _mapped(draft, arr, bad)
    cal = Calibration(
        version=version,
        anchors=anchors,
        pass_percentile=pass_p,
        base_pass_rate=round(pass_rate(draft), 4),
        base_means={d: round(float(mapped[:, j].mean()), 3) for j, d in enumerate(DIMENSIONS)},
        replies=len(arr),
        source=source,
        created=date.today().isoformat(),
    )
    if out is not None:
        Path(out).write_text(json.dumps(cal.to_dict(), indent=2) + "\n", encoding="utf-8")
    return cal


def calibrate_from_replies(
    replies: Path | None = None,
    *,
    version: str = "cal1",
    target_pass: float = 0.25,
    out: Path | None = None,
    device: str = "cpu",
) -> Calibration:
    """Refreeze the calibration from base-model replies (default: the shipped ones)."""
    items = load_reply_items(replies)
    critic = RubricCritic(Embedder(device=device), _identity_calibration())
    feats = critic.features_batch(items)
    return calibrate(
        [f.composite for f in feats],
        version=version,
        unusable=[bool(UNUSABLE_FLAGS & set(f.flags)) for f in feats],
        target_pass=target_pass,
        out=out or Path(__file__).parent / "data" / CALIBRATION_FILE,
        source=str(replies or f"learner/data/{REPLIES_FILE}"),
    )
