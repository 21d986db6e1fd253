"""An evaluation-only critic learned from third-party conversations (Synthetic-Persona-Chat).

``PersonaChatCritic`` scores a reply with three small pairwise rankers (rel / int / val)
over features measured with MiniLM and plain text statistics. The rankers were fitted by
``learner.fit_eval_critic`` so that the real next reply of a Synthetic-Persona-Chat
conversation outranks alternatives; training never sees this critic, so it can judge
whether training made replies better by a standard nobody on this project wrote.
How it is fitted, its held-out accuracies and its calibration: docs/eval_critic.md.

Training data: Synthetic-Persona-Chat (validation split), Jandaghi et al., "Faithful
Persona-based Conversational Dataset Generation with Large Language Models",
arXiv:2312.10007 (2023), google-research-datasets/Synthetic-Persona-Chat, CC BY 4.0.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from core.embeddings import Embedder
from learner.records import DIMENSIONS, CriticInput, Score

__all__ = [
    "FEATURES",
    "SPC_ATTRIBUTION",
    "AgreementReport",
    "Calibration",
    "Encoder",
    "Head",
    "PersonaChatCritic",
    "RankerWeights",
    "critic_agreement",
    "extract_features",
    "load_weights",
]

VERSION = "spc-ranker-v1"
FEATURE_VERSION = "spc-features-v1"
SPC_ATTRIBUTION = (
    "Synthetic-Persona-Chat (validation split), Jandaghi et al., 'Faithful Persona-based "
    "Conversational Dataset Generation with Large Language Models', arXiv:2312.10007 (2023); "
    "google-research-datasets/Synthetic-Persona-Chat; licence CC BY 4.0"
)

Encoder = Callable[[list[str]], np.ndarray]

# Every feature depends on the reply: context-only quantities would cancel in a pairwise ranker.
FEATURES: tuple[str, ...] = (
    "persona_max",
    "persona_mean",
    "user_last",
    "user_earlier_max",
    "bot_own_max",
    "bot_last",
    "recent_context",
    "log_words",
    "has_question",
    "answers_question",
    "ends_sentence",
    "starts_capital",
    "echo_last_words",
    "history_word_share",
    "copied_trigrams",
    "type_token_ratio",
    "function_word_share",
    "persona_word_share",
    "addresses_you",
    "speaks_of_self",
)

# Plain words for the reasons; the measured value follows in parentheses.
_FEATURE_TEXT = {
    "persona_max": "closeness to the user's nearest background fact",
    "persona_mean": "closeness to the user's background as a whole",
    "user_last": "closeness to the user's last message",
    "user_earlier_max": "closeness to the user's earlier messages",
    "bot_own_max": "closeness to the bot's own earlier replies",
    "bot_last": "closeness to the bot's previous reply",
    "recent_context": "closeness to the last few turns",
    "log_words": "length (log words)",
    "has_question": "asking a question",
    "answers_question": "answering the user's question instead of asking back",
    "ends_sentence": "ending as a full sentence",
    "starts_capital": "starting like a sentence",
    "echo_last_words": "share of words echoed from the user's last message",
    "history_word_share": "share of words already used in the dialogue",
    "copied_trigrams": "share of word triples copied from the dialogue",
    "type_token_ratio": "word variety",
    "function_word_share": "share of grammatical words (full sentences vs keyword lists)",
    "persona_word_share": "share of words from the user's background",
    "addresses_you": "addressing the user ('you')",
    "speaks_of_self": "talking about itself ('I', 'my')",
}
_DIM_NAMES = {"rel": "relevance", "int": "interest", "val": "value"}

# A small list of our own, used only for the text statistics below.
_FUNCTION_WORD_TEXT = """a an the and or but so if of to in on at for with from by as is am are
    was were be been being do does did have has had i me my mine you your yours he she it we they them his her
    its our their this that these those what who how why when where not no yes can will would
    there here than then just too very"""
_FUNCTION_WORDS = frozenset(_FUNCTION_WORD_TEXT.split())
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SPLIT_FACTS = re.compile(r"(?<=[.!?])\s+|\n+")
_RECENT_TURNS = 3


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _content(tokens: Sequence[str]) -> set[str]:
    return {t for t in tokens if t not in _FUNCTION_WORDS and len(t) > 2}


def _triples(tokens: Sequence[str]) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)}


def background_facts(background: str) -> list[str]:
    """The background split into sentences (SPC persona facts are one sentence each)."""
    return [s.strip() for s in _SPLIT_FACTS.split(background) if s.strip()]


def _texts_of(item: CriticInput) -> list[str]:
    return [item.reply, *background_facts(item.background), *(c for _, c in item.history if c)]


def _max_cos(vecs: np.ndarray, r: np.ndarray) -> float:
    return float(np.max(vecs @ r)) if len(vecs) else 0.0


def _item_features(item: CriticInput, vec: Callable[[str], np.ndarray]) -> list[float]:
    r = vec(item.reply)
    facts = background_facts(item.background)
    users = [c for role, c in item.history if role == "user" and c]
    bots = [c for role, c in item.history if role == "assistant" and c]
    recent = [c for _, c in item.history if c][-_RECENT_TURNS:]
    fact_v = np.array([vec(f) for f in facts]).reshape(-1, r.shape[0])
    user_v = np.array([vec(u) for u in users]).reshape(-1, r.shape[0])
    bot_v = np.array([vec(b) for b in bots]).reshape(-1, r.shape[0])
    recent_cos = 0.0
    if recent:
        centre = np.sum([vec(c) for c in recent], axis=0)
        recent_cos = float(centre @ r / (np.linalg.norm(centre) or 1.0))

    toks = _tokens(item.reply)
    n = len(toks)
    last_user = users[-1] if users else ""
    last_toks = set(_tokens(last_user))
    hist_toks: list[str] = []
    for _, c in item.history:
        hist_toks.extend(_tokens(c))
    hist_set = set(hist_toks)
    content = _content(toks)
    persona_content = _content(_tokens(item.background))
    triples = _triples(toks)
    stripped = item.reply.strip()
    asks = "?" in item.reply
    return [
        _max_cos(fact_v, r),
        float(np.mean(fact_v @ r)) if len(fact_v) else 0.0,
        float(user_v[-1] @ r) if len(user_v) else 0.0,
        _max_cos(user_v[:-1], r),
        _max_cos(bot_v, r),
        float(bot_v[-1] @ r) if len(bot_v) else 0.0,
        recent_cos,
        math.log1p(n),
        float(asks),
        float("?" in last_user and not asks),
        float(stripped[-1:] in {".", "!", "?", ")"}),
        float(stripped[:1].isupper()),
        sum(t in last_toks for t in toks) / n if n else 0.0,
        sum(t in hist_set for t in toks) / n if n else 0.0,
        len(triples & _triples(hist_toks)) / len(triples) if triples else 0.0,
        len(set(toks)) / n if n else 0.0,
        sum(t in _FUNCTION_WORDS for t in toks) / n if n else 0.0,
        len(content & persona_content) / len(content) if content else 0.0,
        float(any(t in {"you", "your", "you're", "yours"} for t in toks)),
        float(any(t in {"i", "my", "i'm", "me", "mine"} for t in toks)),
    ]


def extract_features(items: Sequence[CriticInput], encode: Encoder) -> np.ndarray:
    """The (n, len(FEATURES)) feature matrix; one ``encode`` call over the deduplicated texts."""
    unique: dict[str, int] = {}
    for item in items:
        for text in _texts_of(item):
            unique.setdefault(text, len(unique))
    vectors = encode(list(unique)) if unique else np.zeros((0, Embedder.dim), np.float32)

    def vec(text: str) -> np.ndarray:
        return vectors[unique[text]]

    rows = [_item_features(item, vec) for item in items]
    return np.asarray(rows, dtype=np.float64).reshape(len(items), len(FEATURES))


@dataclass(frozen=True)
class Calibration:
    """Maps a head's raw score to 1..5 through quantiles of REAL held-out SPC replies.

    ``levels`` (percent) and ``quantiles`` (raw scores of real replies at those levels) are
    frozen at fit time. The real-reply quantile at ``anchor_levels[i]`` maps to
    ``anchor_values[i]``, linearly in between; below the lowest anchor the first segment's
    slope continues down to 1, above the highest everything is 5.
    """

    levels: tuple[float, ...]
    quantiles: tuple[float, ...]
    anchor_levels: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0)
    anchor_values: tuple[float, ...] = (1.5, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0)

    def _anchor_scores(self) -> np.ndarray:
        return np.interp(self.anchor_levels, self.levels, self.quantiles)

    def expected(self, raw: np.ndarray) -> np.ndarray:
        xs = self._anchor_scores()
        vs = np.asarray(self.anchor_values)
        out = np.interp(raw, xs, vs)
        slope = (vs[1] - vs[0]) / max(xs[1] - xs[0], 1e-9)
        below = raw < xs[0]
        out[below] = vs[0] - slope * (xs[0] - raw[below])
        return np.clip(out, 1.0, 5.0)

    def percentile(self, raw: np.ndarray) -> np.ndarray:
        """The share (percent) of real held-out SPC replies that score below ``raw``."""
        return np.interp(raw, self.quantiles, self.levels)


@dataclass(frozen=True)
class Head:
    name: str
    weights: np.ndarray  # over standardised features
    negatives: str
    heldout_accuracy: float
    calibration: Calibration


@dataclass(frozen=True)
class RankerWeights:
    version: str
    embedder_id: str
    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    heads: dict[str, Head]
    meta: dict[str, Any]

    def digest(self) -> str:
        """A short hash of everything that changes a score."""
        payload = json.dumps(
            {
                "features": list(self.features),
                "mean": [round(x, 9) for x in self.mean.tolist()],
                "std": [round(x, 9) for x in self.std.tolist()],
                "heads": {
                    k: [[round(x, 9) for x in h.weights.tolist()], list(h.calibration.quantiles)]
                    for k, h in sorted(self.heads.items())
                },
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "feature_version": FEATURE_VERSION,
            "embedder": self.embedder_id,
            "attribution": SPC_ATTRIBUTION,
            "features": list(self.features),
            "standardize": {"mean": self.mean.tolist(), "std": self.std.tolist()},
            "heads": {
                k: {
                    "weights": h.weights.tolist(),
                    "negatives": h.negatives,
                    "heldout_accuracy": h.heldout_accuracy,
                    "calibration": {
                        "levels": list(h.calibration.levels),
                        "quantiles": list(h.calibration.quantiles),
                        "anchor_levels": list(h.calibration.anchor_levels),
                        "anchor_values": list(h.calibration.anchor_values),
                    },
                }
                for k, h in self.heads.items()
            },
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankerWeights:
        features = tuple(data["features"])
        if features != FEATURES:
            raise ValueError(f"weights are for features {features}, this code computes {FEATURES}")
        heads = {}
        for name in DIMENSIONS:
            h = data["heads"][name]
            cal = h["calibration"]
            heads[name] = Head(
                name=name,
                weights=np.asarray(h["weights"], dtype=np.float64),
                negatives=h["negatives"],
                heldout_accuracy=float(h["heldout_accuracy"]),
                calibration=Calibration(
                    levels=tuple(cal["levels"]),
                    quantiles=tuple(cal["quantiles"]),
                    anchor_levels=tuple(cal["anchor_levels"]),
                    anchor_values=tuple(cal["anchor_values"]),
                ),
            )
        return cls(
            version=data["version"],
            embedder_id=data["embedder"],
            features=features,
            mean=np.asarray(data["standardize"]["mean"], dtype=np.float64),
            std=np.asarray(data["standardize"]["std"], dtype=np.float64),
            heads=heads,
            meta=dict(data.get("meta", {})),
        )

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def load_weights(path: str | Path | None = None) -> RankerWeights:
    """The frozen weights: ``path``, or the shipped learner/data/eval_critic.json."""
    if path is None:
        text = resources.files("learner").joinpath("data", "eval_critic.json").read_text("utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return RankerWeights.from_dict(json.loads(text))


def _score_from_expected(expected: float) -> int:
    return int(min(5, max(1, math.floor(expected + 0.5))))


class PersonaChatCritic:
    """Evaluation critic: pairwise rankers fitted on Synthetic-Persona-Chat (see module doc).

    An empty reply is scored 1/1/1 with the reason "the reply is empty" (it is judgeable:
    it carries nothing). A reply with no background or no history is scored with those
    features at 0; the rankers were fitted on replies that follow at least one user turn.
    """

    def __init__(self, embedder: Embedder, weights_path: str | Path | None = None):
        self.embedder = embedder
        self.weights = load_weights(weights_path)
        if self.weights.embedder_id != embedder.model_id:
            raise ValueError(
                f"weights were fitted on {self.weights.embedder_id}, not {embedder.model_id}"
            )
        self.model_id = f"{self.weights.version}:{self.weights.digest()}"
        self.prompt_version = FEATURE_VERSION

    def raw_scores(self, features: np.ndarray) -> dict[str, np.ndarray]:
        z = self.weights.standardise(features)
        return {d: z @ self.weights.heads[d].weights for d in DIMENSIONS}

    def score_batch(self, items: Sequence[CriticInput]) -> list[Score]:
        if not items:
            return []
        feats = extract_features(items, self.embedder.encode)
        raw = self.raw_scores(feats)
        expected = {d: self.weights.heads[d].calibration.expected(raw[d]) for d in DIMENSIONS}
        pct = {d: self.weights.heads[d].calibration.percentile(raw[d]) for d in DIMENSIONS}
        z = self.weights.standardise(feats)
        out = []
        for i, item in enumerate(items):
            if not item.reply.strip():
                out.append(self._empty())
                continue
            exp = {d: float(expected[d][i]) for d in DIMENSIONS}
            ints = {d: _score_from_expected(exp[d]) for d in DIMENSIONS}
            reasons = {
                d: self._reason(d, ints[d], float(pct[d][i]), z[i], feats[i]) for d in DIMENSIONS
            }
            raw_json = {
                "features": dict(
                    zip(FEATURES, (round(float(v), 4) for v in feats[i]), strict=True)
                ),
                "head_scores": {d: round(float(raw[d][i]), 4) for d in DIMENSIONS},
                "percentile_among_real_spc": {d: round(float(pct[d][i]), 1) for d in DIMENSIONS},
            }
            out.append(
                Score(
                    **ints,
                    reasons=reasons,
                    raw=json.dumps(raw_json),
                    critic_model_id=self.model_id,
                    expected=exp,
                )
            )
        return out

    def _empty(self) -> Score:
        return Score(
            rel=1,
            int=1,
            val=1,
            reasons={d: "the reply is empty" for d in DIMENSIONS},
            raw=json.dumps({"empty_reply": True}),
            critic_model_id=self.model_id,
            expected={d: 1.0 for d in DIMENSIONS},
        )

    def _reason(self, dim: str, score: int, pct: float, z: np.ndarray, x: np.ndarray) -> str:
        contrib = z * self.weights.heads[dim].weights
        up, down = int(np.argmax(contrib)), int(np.argmin(contrib))
        parts = [f"{_DIM_NAMES[dim]} {score}: above {pct:.0f}% of real Persona-Chat replies"]
        for label, k, moved in (
            ("raised", up, contrib[up] > 0),
            ("lowered", down, contrib[down] < 0),
        ):
            if moved:
                side = "above" if z[k] > 0 else "below"
                parts.append(
                    f"{label} most by {_FEATURE_TEXT[FEATURES[k]]} = {x[k]:.2f} "
                    f"({side} the training mean)"
                )
        return "; ".join(parts)


@dataclass(frozen=True)
class AgreementReport:
    """How two critics agree on the same replies (only replies both scored count)."""

    n: int
    spearman: dict[str, float | None]
    mean_spearman: float | None
    pair_agreement: float | None  # share of pairs critic a orders whose order b shares
    pairs: int


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = _average_ranks(a), _average_ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties sharing their mean rank (numpy only: scipy is not everywhere)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def _pair_agreement(
    a: np.ndarray, b: np.ndarray, groups: np.ndarray | None
) -> tuple[float | None, int]:
    agree = total = 0
    for i in range(len(a) - 1):
        da = np.sign(a[i + 1 :] - a[i])
        db = np.sign(b[i + 1 :] - b[i])
        mask = da != 0
        if groups is not None:
            mask &= groups[i + 1 :] == groups[i]
        total += int(mask.sum())
        agree += int((da[mask] == db[mask]).sum())
    return (agree / total if total else None), total


def critic_agreement(
    a: Sequence[Score], b: Sequence[Score], groups: Sequence[str] | None = None
) -> AgreementReport:
    """Spearman per dimension and of the mean of the three, and pairwise order agreement.

    ``a[i]`` and ``b[i]`` judge the same reply. ``groups`` (e.g. a context id per reply)
    restricts the pairs to replies of the same group; without it every pair counts. A pair
    counts when ``a`` prefers one reply (no tie on the mean score); it agrees when ``b``
    strictly prefers the same one.
    """
    if len(a) != len(b) or (groups is not None and len(groups) != len(a)):
        raise ValueError("a, b (and groups) must have the same length")
    keep = [i for i in range(len(a)) if a[i].scored and b[i].scored]

    def values(scores: Sequence[Score], dim: str) -> np.ndarray:
        return np.array([scores[i].value(dim) for i in keep], dtype=np.float64)

    per_dim = {d: (values(a, d), values(b, d)) for d in DIMENSIONS}
    mean_a = np.mean([per_dim[d][0] for d in DIMENSIONS], axis=0) if keep else np.zeros(0)
    mean_b = np.mean([per_dim[d][1] for d in DIMENSIONS], axis=0) if keep else np.zeros(0)
    grp = np.array([groups[i] for i in keep]) if groups is not None else None
    share, pairs = _pair_agreement(mean_a, mean_b, grp)
    return AgreementReport(
        n=len(keep),
        spearman={d: _spearman(*per_dim[d]) for d in DIMENSIONS},
        mean_spearman=_spearman(mean_a, mean_b),
        pair_agreement=share,
        pairs=pairs,
    )
