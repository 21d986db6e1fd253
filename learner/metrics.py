"""Evaluation metrics: critic-score statistics, ALOE curves and critic-independent measures.

Everything here is a function of its arguments (no hidden state). The few metrics that need
a model take it explicitly: perplexity takes a *runner* (``LocalModel.run_exclusive`` or
``runner_from_hf(model, tokenizer)``) and the embedding metrics take an ``Embedder``.

Definitions (``tests/test_metrics.py`` works each one through by hand):

- ``mean_ci``: the mean with a seeded percentile-bootstrap confidence interval.
- ``per_turn_al``: AL(k), the mean judge score at turn k over the users (ALOE).
- ``aloe_fit``: IR = least-squares slope of AL(k) against k; N-IR = the same slope after
  min-max normalising AL over the turns; R^2 of the (un-normalised) fit.
- ``reply_perplexity``: exp of the mean token NLL of the reply tokens given their context.
- ``discovery``: which structured traits a dialogue surfaced (lexical or embedding match).
- ``is_passive`` / ``is_question`` / ``repetition_scores``: per-reply detectors.
- ``spearman``: rank correlation with average ranks for ties.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

from core.embeddings import Embedder

__all__ = [
    "DISCOVERY_SIMILARITY",
    "PASSIVE_PATTERNS",
    "AloeFit",
    "DiscoveryResult",
    "MeanCI",
    "ModelRunner",
    "PerplexityResult",
    "ReplyContext",
    "Trait",
    "TraitHit",
    "aloe_fit",
    "background_similarity",
    "discovery",
    "is_passive",
    "is_question",
    "lexical_mention",
    "linear_fit",
    "mean_ci",
    "passivity_rate",
    "per_turn_al",
    "question_rate",
    "repetition_scores",
    "reply_perplexity",
    "runner_from_hf",
    "spearman",
    "structured_traits",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
ModelRunner = Callable[[Callable[[Any, Any], Any]], Any]

# Cosine (MiniLM, unit vectors) at or above which a reply sentence or a memory fact counts
# as mentioning a trait. Calibrated on hand-made pairs: paraphrased mentions ("Yoga sounds
# like a good way to relax" vs "yoga": 0.67; "a favourite stamp in your collection" vs
# "collecting stamps": 0.61; "your graduate degree in strategy" vs "master's in strategic
# studies": 0.64) score 0.5 or more, while questions that merely ask about the topic
# ("What did you study at university?": 0.41) and unrelated replies (0.1) stay below.
DISCOVERY_SIMILARITY = 0.5

# Stock phrases of a passive assistant (the method forbids "How can I help you?").
PASSIVE_PATTERNS: tuple[str, ...] = (
    r"\bhow (?:can|may|could|might) i (?:help|assist|be of (?:help|assistance|service))",
    r"\bwhat can i (?:do|help you with)\b",
    r"\bis there anything (?:else )?(?:i can|you(?:'d| would)? (?:like|need|want))",
    r"\banything else (?:i can|you(?:'d| would)? like|you need)\b",
    r"\bas an ai\b",
    r"\bas a (?:large )?language model\b",
    r"\bi(?:'m| am) (?:just |only )?an ai\b",
    r"\bi(?:'m| am) (?:here|happy|glad) to (?:help|assist)\b",
    r"\b(?:let me know|feel free to ask) if you (?:need|have)\b",
    r"\bi don'?t have (?:personal )?(?:feelings|opinions|experiences|emotions)\b",
    r"\bwhat would you like to (?:talk|chat) about\b",
)
_PASSIVE = re.compile("|".join(f"(?:{p})" for p in PASSIVE_PATTERNS), re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n+")
# Words that say nothing about *which* trait it is (verbs of the trait phrases included).
_GENERIC_TEXT = """a an the and or of in at on to for from with by as is are was were be been his
    her their my your our its this that these those some any who which doing playing making
    going collecting earned studied holds hold holding completed finished received got took did
    degree master master's masters bachelor bachelor's diploma certificate school course study
    studies training before after during years year work works working job also very"""
_GENERIC = frozenset(_GENERIC_TEXT.split())
_STEM = 5


@dataclass(frozen=True)
class MeanCI:
    """A mean with its (bootstrap) confidence interval; all None when there is no data."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_ci(
    values: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> MeanCI:
    """The mean and its percentile-bootstrap interval; the same seed gives the same interval."""
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be between 0 and 1")
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        return MeanCI(None, None, None, 0)
    mean = float(data.mean())
    if data.size == 1 or n_boot < 1:
        return MeanCI(mean, mean, mean, int(data.size))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_boot, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return MeanCI(mean, float(low), float(high), int(data.size))


def per_turn_al(dialogue_scores: Sequence[Mapping[int, float | None]]) -> dict[int, float]:
    """AL(k): the mean score at turn k over the dialogues that have a score there.

    Each element maps a turn index to that dialogue's score (None = unscored, skipped).
    """
    sums: dict[int, list[float]] = {}
    for scores in dialogue_scores:
        for turn, value in scores.items():
            if value is not None:
                sums.setdefault(int(turn), []).append(float(value))
    return {turn: float(np.mean(vals)) for turn, vals in sorted(sums.items())}


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float | None]:
    """Least-squares (slope, intercept, R^2); R^2 is None when y does not vary."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.size != ys.size or xs.size < 2:
        raise ValueError("a line needs at least two (x, y) points of equal count")
    dx = xs - xs.mean()
    sxx = float(dx @ dx)
    if sxx == 0.0:
        raise ValueError("x must take at least two different values")
    slope = float(dx @ (ys - ys.mean())) / sxx
    intercept = float(ys.mean() - slope * xs.mean())
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    ss_res = float(((ys - (intercept + slope * xs)) ** 2).sum())
    r2 = None if ss_tot == 0.0 else 1.0 - ss_res / ss_tot
    return slope, intercept, r2


@dataclass(frozen=True)
class AloeFit:
    """IR, N-IR and R^2 of AL(k) over k (None when fewer than two turns are scored)."""

    ir: float | None
    n_ir: float | None
    r2: float | None
    turns: tuple[int, ...] = ()
    al: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def aloe_fit(al: Mapping[int, float]) -> AloeFit:
    """Slope of AL(k) (IR), slope after min-max normalising AL (N-IR), and R^2 of the fit.

    A flat curve has IR = N-IR = 0 and no R^2 (nothing to explain).
    """
    turns = tuple(sorted(al))
    values = tuple(float(al[k]) for k in turns)
    if len(turns) < 2:
        return AloeFit(None, None, None, turns, values)
    slope, _intercept, r2 = linear_fit(turns, values)
    lo, hi = min(values), max(values)
    if hi == lo:
        n_slope = 0.0
    else:
        n_slope, _, _ = linear_fit(turns, [(v - lo) / (hi - lo) for v in values])
    return AloeFit(slope, n_slope, r2, turns, values)


# ----------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class ReplyContext:
    """A reply and what the chatbot saw before it: (role, content) chat messages."""

    messages: tuple[tuple[str, str], ...]
    reply: str


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float | None
    mean_nll: float | None  # per reply token, nats
    tokens: int
    replies: int
    # Mean NLL per reply (in input order; None for a reply with no tokens).
    per_reply_nll: tuple[float | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("per_reply_nll")
        return data


def runner_from_hf(model: Any, tokenizer: Any) -> ModelRunner:
    """A runner for a plain transformers model and tokenizer (called on this thread)."""
    return lambda fn: fn(model, tokenizer)


def _encode_pair(tokenizer: Any, item: ReplyContext, max_tokens: int) -> tuple[list[int], int]:
    chat = [{"role": role, "content": content} for role, content in item.messages]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply = tokenizer(item.reply, add_special_tokens=False)["input_ids"][:max_tokens]
    keep = max(1, max_tokens - len(reply))  # drop the oldest context first
    return [*context[-keep:], *reply], len(reply)


def reply_perplexity(
    items: Sequence[ReplyContext],
    run: ModelRunner,
    *,
    batch_size: int = 8,
    max_tokens: int = 2048,
) -> PerplexityResult:
    """Perplexity of the replies under the runner's model with its adapters disabled.

    Each reply is scored given its own context (system prompt + dialogue so far, in the
    model's chat template); only reply tokens count. The result pools all reply tokens.
    """
    if not items:
        return PerplexityResult(None, None, 0, 0)

    def job(model: Any, tokenizer: Any) -> list[tuple[float, int]]:
        import torch

        adapters_off = model.disable_adapter() if hasattr(model, "peft_config") else nullcontext()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        device = next(model.parameters()).device
        out: list[tuple[float, int]] = []
        with torch.inference_mode(), adapters_off:
            for start in range(0, len(items), batch_size):
                encoded = [
                    _encode_pair(tokenizer, it, max_tokens)
                    for it in items[start : start + batch_size]
                ]
                width = max(len(ids) for ids, _ in encoded)
                ids = torch.full((len(encoded), width), pad, dtype=torch.long)
                mask = torch.zeros((len(encoded), width), dtype=torch.long)
                for row, (seq, _n) in enumerate(encoded):  # right padding keeps positions
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, : len(seq)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                targets = ids[:, 1:].to(device)
                token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                for row, (seq, n_reply) in enumerate(encoded):
                    if n_reply == 0:
                        out.append((0.0, 0))
                        continue
                    # Target position p predicts token p + 1: the reply occupies the last n.
                    end = len(seq) - 1
                    nll = -float(token_lp[row, end - n_reply : end].sum())
                    out.append((nll, n_reply))
        return out

    results = run(job)
    total_nll = sum(nll for nll, _ in results)
    total_tokens = sum(n for _, n in results)
    per_reply = tuple((nll / n) if n else None for nll, n in results)
    if total_tokens == 0:
        return PerplexityResult(None, None, 0, len(items), per_reply)
    mean_nll = total_nll / total_tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, total_tokens, len(items), per_reply)


# ------------------------------------------------------------------- embedding metrics


def background_similarity(
    embedder: Embedder, replies: Sequence[str], background: str
) -> list[float]:
    """Cosine between each reply and the (hidden) background text."""
    if not replies:
        return []
    vectors = embedder.encode([background, *replies])
    return [float(v) for v in vectors[1:] @ vectors[0]]


@dataclass(frozen=True)
class Trait:
    kind: str  # occupation | education | hobby
    text: str


def structured_traits(traits: Any) -> list[Trait]:
    """Occupation, education and each hobby of a ``personas.records.Traits`` (empty ones left out)."""
    out = []
    if getattr(traits, "occupation", ""):
        out.append(Trait("occupation", traits.occupation))
    if getattr(traits, "education", ""):
        out.append(Trait("education", traits.education))
    out.extend(Trait("hobby", h) for h in getattr(traits, "hobbies", ()) if h.strip())
    return out


def _stems(text: str) -> set[str]:
    return {w[:_STEM] for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _GENERIC}


def lexical_mention(trait: str, text: str) -> bool:
    """True when at least half (rounded up) of the trait's key words occur in ``text``.

    Key words are the trait's words minus generic ones ("earned", "degree", "playing"...),
    compared by their first five letters so "photographs" matches "photography".
    """
    keys = _stems(trait)
    if not keys:
        return False
    found = len(keys & _stems(text))
    return found >= math.ceil(len(keys) / 2)


def _sentences(texts: Sequence[str]) -> list[str]:
    return [s.strip() for t in texts for s in _SENTENCE.split(t) if s.strip()]


@dataclass(frozen=True)
class TraitHit:
    trait: Trait
    in_replies: bool
    in_memory: bool
    how: str  # lexical | embedding | "" (not found)
    similarity: float | None = None

    @property
    def found(self) -> bool:
        return self.in_replies or self.in_memory


@dataclass(frozen=True)
class DiscoveryResult:
    hits: tuple[TraitHit, ...] = field(default_factory=tuple)

    @property
    def traits(self) -> int:
        return len(self.hits)

    @property
    def found(self) -> int:
        return sum(1 for h in self.hits if h.found)

    @property
    def rate(self) -> float | None:
        """Share of traits found in the replies or the memory (None without traits)."""
        return self.found / self.traits if self.hits else None

    @property
    def reply_rate(self) -> float | None:
        """Share of traits the bot's replies mentioned."""
        return sum(1 for h in self.hits if h.in_replies) / self.traits if self.hits else None


def _match(
    trait: Trait,
    texts: Sequence[str],
    vectors: np.ndarray | None,
    trait_vec: np.ndarray | None,
    threshold: float,
) -> tuple[bool, str, float | None]:
    if any(lexical_mention(trait.text, t) for t in texts):
        return True, "lexical", None
    if vectors is None or trait_vec is None or len(vectors) == 0:
        return False, "", None
    best = float(np.max(vectors @ trait_vec))
    return best >= threshold, ("embedding" if best >= threshold else ""), best


def discovery(
    traits: Sequence[Trait],
    replies: Sequence[str],
    memory_texts: Sequence[str] = (),
    *,
    embedder: Embedder | None = None,
    threshold: float = DISCOVERY_SIMILARITY,
) -> DiscoveryResult:
    """Which traits the bot's replies mention or its memory holds.

    A trait counts as mentioned by a text when ``lexical_mention`` holds, or (with an
    embedder) when the cosine between the trait and a reply *sentence* / a memory fact is at
    least ``threshold``.
    """
    if not traits:
        return DiscoveryResult()
    reply_sents = _sentences(replies)
    memory = [m for m in memory_texts if m.strip()]
    trait_vecs = reply_vecs = memory_vecs = None
    if embedder is not None:
        vecs = embedder.encode([t.text for t in traits] + reply_sents + memory)
        trait_vecs = vecs[: len(traits)]
        reply_vecs = vecs[len(traits) : len(traits) + len(reply_sents)]
        memory_vecs = vecs[len(traits) + len(reply_sents) :]
    hits = []
    for i, trait in enumerate(traits):
        tv = trait_vecs[i] if trait_vecs is not None else None
        in_r, how_r, sim_r = _match(trait, reply_sents, reply_vecs, tv, threshold)
        in_m, how_m, sim_m = _match(trait, memory, memory_vecs, tv, threshold)
        sims = [s for s in (sim_r, sim_m) if s is not None]
        hits.append(TraitHit(trait, in_r, in_m, how_r or how_m, max(sims) if sims else None))
    return DiscoveryResult(tuple(hits))


# ------------------------------------------------------------------ reply detectors


def is_passive(text: str) -> bool:
    """A stock assistant phrase ("How can I help you?", "As an AI", ...)."""
    return bool(_PASSIVE.search(text.replace("\u2019", "'")))


def is_question(text: str) -> bool:
    return "?" in text


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def passivity_rate(replies: Sequence[str]) -> float | None:
    return _rate([is_passive(r) for r in replies])


def question_rate(replies: Sequence[str]) -> float | None:
    return _rate([is_question(r) for r in replies])


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def repetition_scores(
    replies: Sequence[str], *, n: int = 3, earlier: Sequence[str] = ()
) -> list[float]:
    """For each reply, the share of its word n-grams already used in the bot's earlier texts.

    ``earlier`` holds bot texts before the first reply (e.g. the greeting). A reply shorter
    than ``n`` words scores 0.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    seen: set[tuple[str, ...]] = set()
    for text in earlier:
        seen |= _ngrams(text, n)
    out = []
    for reply in replies:
        grams = _ngrams(reply, n)
        out.append(len(grams & seen) / len(grams) if grams else 0.0)
        seen |= grams
    return out


# --------------------------------------------------------------------------- agreement


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson on average ranks); None if fewer than 3 pairs or a constant side."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of equal length")
    if len(x) < 3:
        return None
    rx = _average_ranks(np.asarray(x, dtype=np.float64))
    ry = _average_ranks(np.asarray(y, dtype=np.float64))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return None
    return float(dx @ dy) / denom
