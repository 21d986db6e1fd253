"""Fits the evaluation critic (``learner.eval_critic``) on Synthetic-Persona-Chat.

Each sampled context is a point in an SPC conversation where one speaker (the "bot") is
about to speak; the other speaker is the user, whose persona facts are the background.
The real next line must outrank alternatives taken from the data or simple
transformations of it (docs/eval_critic.md). Conversations are split 80/20; the rankers
are fitted on the 80% and measured, and calibrated, on the 20%.

Data: Synthetic-Persona-Chat (validation split), Jandaghi et al., arXiv:2312.10007 (2023),
google-research-datasets/Synthetic-Persona-Chat, CC BY 4.0.

    python -m learner.critic_tools_cli fit-eval-critic --out learner/data/eval_critic.json
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from core.embeddings import Embedder
from learner.eval_critic import (
    FEATURES,
    VERSION,
    Calibration,
    Head,
    PersonaChatCritic,
    RankerWeights,
    extract_features,
)
from learner.records import DIMENSIONS, CriticInput

__all__ = [
    "DEFAULT_DATA",
    "FitResult",
    "HeadResult",
    "SpcConversation",
    "fit_eval_critic",
    "load_spc",
]

log = logging.getLogger(__name__)

DEFAULT_DATA = Path("/work/shared/data/synthetic-persona-chat/Synthetic-Persona-Chat_valid.csv")
DEFAULT_CACHE = Path("/tmp/upc-eval-critic-cache")
HEAD_NEGATIVES = {
    "rel": "a line from another conversation (other personas) at about the same position",
    "int": "another turn of the same conversation (earlier, later) or the user's last message echoed",
    "val": (
        "a truncated copy of the real reply, a bare list of its keywords, a stock reply, or a "
        "repetition (the bot's own earlier line or the user's last message)"
    ),
}
# Generic replies of our own writing; they answer nothing in particular.
STOCK_REPLIES = (
    "Okay.",
    "I see.",
    "That's nice.",
    "Cool, thanks for sharing.",
    "Interesting, go on.",
    "Hmm, I don't know.",
    "Sure, whatever you think.",
    "Yes.",
    "Good for you!",
    "Right, makes sense.",
    "Wow.",
    "Alright then.",
    "Nice to hear that.",
    "I have no opinion on that.",
    "Is there something I can do for you?",
    "Let me know if anything else comes up.",
)
_LEVELS = tuple(2.5 * i for i in range(41))


@dataclass(frozen=True)
class SpcConversation:
    index: int
    personas: tuple[tuple[str, ...], tuple[str, ...]]  # User 1's facts, User 2's facts
    lines: tuple[tuple[int, str], ...]  # (speaker 0 = User 1 / 1 = User 2, text)


@dataclass(frozen=True)
class HeadResult:
    train_pairs: int
    heldout_pairs: int
    train_accuracy: float
    heldout_accuracy: float
    heldout_by_kind: dict[str, float]


@dataclass
class FitResult:
    out_path: Path
    model_id: str
    conversations: int
    train_conversations: int
    heldout_conversations: int
    contexts: dict[str, int]
    heads: dict[str, HeadResult]
    # head -> negative family (the head that family was made for) -> held-out accuracy
    cross_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    embed_seconds: float = 0.0
    seconds: float = 0.0


def _facts(cell: str) -> tuple[str, ...]:
    out = []
    for fact in cell.splitlines():
        fact = fact.strip()
        if fact:
            out.append(fact if fact[-1] in ".!?" else fact + ".")
    return tuple(out)


def load_spc(path: Path = DEFAULT_DATA) -> list[SpcConversation]:
    """Parses the SPC csv; a line without a ``User n:`` prefix continues the previous one."""
    convs = []
    with Path(path).open(encoding="utf-8", newline="") as fh:
        for index, row in enumerate(csv.DictReader(fh)):
            lines: list[tuple[int, str]] = []
            for raw in row["Best Generated Conversation"].splitlines():
                raw = raw.strip()
                head, _, rest = raw.partition(":")
                if head in ("User 1", "User 2") and rest.strip():
                    lines.append((int(head[-1]) - 1, rest.strip()))
                elif raw and lines:
                    lines[-1] = (lines[-1][0], f"{lines[-1][1]} {raw}")
            personas = (_facts(row["user 1 personas"]), _facts(row["user 2 personas"]))
            if len(lines) >= 4 and all(personas):
                convs.append(SpcConversation(index, personas, tuple(lines)))
    return convs


@dataclass
class _Pairs:
    """All items to featurise, and the (better, worse) pairs over them."""

    items: list[CriticInput] = field(default_factory=list)
    real: list[tuple[int, bool]] = field(default_factory=list)  # (item, held out)
    pairs: list[tuple[int, int, str, str, bool]] = field(default_factory=list)

    def add(self, item: CriticInput) -> int:
        self.items.append(item)
        return len(self.items) - 1


def _truncate(reply: str, rng: random.Random) -> str | None:
    words = reply.split()
    if len(words) < 4:
        return None
    keep = max(1, int(len(words) * rng.uniform(0.3, 0.6)))
    return " ".join(words[:keep]).rstrip(".,!?;:")


def _keywords(reply: str, rng: random.Random) -> str | None:
    words = [w.strip('.,!?;:"()').lower() for w in reply.split()]
    seen = list(dict.fromkeys(w for w in words if len(w) > 3 and w.isalpha()))
    if len(seen) < 2:
        return None
    return rng.choice((", ", " ")).join(seen[:5])


def _add_context(
    acc: _Pairs,
    conv: SpcConversation,
    bot: int,
    t: int,
    others: Sequence[SpcConversation],
    held: bool,
    rng: random.Random,
) -> None:
    history = tuple(("assistant" if s == bot else "user", text) for s, text in conv.lines[:t])
    background = " ".join(conv.personas[1 - bot])

    def item(reply: str) -> int:
        return acc.add(CriticInput("the user", background, history, reply))

    reply = conv.lines[t][1]
    real = item(reply)
    acc.real.append((real, held))

    def pair(neg_text: str | None, head: str, kind: str) -> None:
        if neg_text and neg_text.strip() and neg_text.strip() != reply.strip():
            acc.pairs.append((real, item(neg_text), head, kind, held))

    for _ in range(2):
        other = rng.choice(others)
        while other.index == conv.index:
            other = rng.choice(others)
        j = min(len(other.lines) - 1, max(0, t + rng.randint(-2, 2)))
        pair(other.lines[j][1], "rel", "other_conversation")
    if t >= 2:
        pair(conv.lines[rng.randrange(0, t - 1)][1], "int", "earlier_turn")
    if t + 2 < len(conv.lines):
        pair(conv.lines[rng.randrange(t + 2, len(conv.lines))][1], "int", "later_turn")
    last_user = next(text for s, text in reversed(conv.lines[:t]) if s != bot)
    pair(last_user, "int", "echo_user")
    pair(_truncate(reply, rng), "val", "truncated")
    pair(_keywords(reply, rng), "val", "keywords")
    pair(rng.choice(STOCK_REPLIES), "val", "stock")
    # The rubric's "repetition": the bot's own earlier line again, or the user's words back.
    own = [text for s, text in conv.lines[:t] if s == bot]
    pair(rng.choice([*own, last_user]), "val", "repetition")


def _build_pairs(
    train: Sequence[SpcConversation],
    held: Sequence[SpcConversation],
    contexts_per_side: int,
    rng: random.Random,
) -> _Pairs:
    acc = _Pairs()
    for group, is_held in ((train, False), (held, True)):
        for conv in group:
            for bot in (0, 1):
                # Turns of the bot that follow at least one line of the user.
                first_user = next((i for i, (s, _) in enumerate(conv.lines) if s != bot), None)
                if first_user is None:
                    continue
                turns = [i for i, (s, _) in enumerate(conv.lines) if s == bot and i > first_user]
                for t in rng.sample(turns, min(contexts_per_side, len(turns))):
                    _add_context(acc, conv, bot, t, group, is_held, rng)
    return acc


class DiskCachedEncoder:
    """Embeds with the embedder, remembering vectors in an .npz under ``cache_dir``."""

    CHUNK = 4096

    def __init__(self, embedder: Embedder, cache_dir: Path | None):
        self.embedder = embedder
        key = hashlib.sha256(embedder.model_id.encode()).hexdigest()[:10]
        self.path = cache_dir / f"spc-{key}.npz" if cache_dir else None
        self.vectors: dict[str, np.ndarray] = {}
        if self.path and self.path.exists():
            data = np.load(self.path)
            self.vectors = dict(zip(data["texts"].tolist(), data["vectors"], strict=True))

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        log.info("embedding %d new texts (%d cached)", len(missing), len(self.vectors))
        # In chunks, saved after each, so an interrupted fit resumes where it stopped.
        for start in range(0, len(missing), self.CHUNK):
            chunk = missing[start : start + self.CHUNK]
            self.vectors.update(zip(chunk, self.embedder.encode(chunk), strict=True))
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                keys = list(self.vectors)
                np.savez(
                    self.path, texts=np.array(keys), vectors=np.stack(list(self.vectors.values()))
                )
        return np.stack([self.vectors[t] for t in texts]) if texts else np.zeros((0, Embedder.dim))


def _accuracy(diff: np.ndarray) -> float:
    return float(np.mean((diff > 0) + 0.5 * (diff == 0))) if len(diff) else float("nan")


def _fit_head(z: np.ndarray, pos: np.ndarray, neg: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """Pairwise logistic ranker on feature differences, each kind of negative weighed alike."""
    d = z[pos] - z[neg]
    _, inverse, counts = np.unique(kinds, return_inverse=True, return_counts=True)
    weight = (len(kinds) / (len(counts) * counts))[inverse]
    x = np.vstack([d, -d])
    y = np.concatenate([np.ones(len(d)), np.zeros(len(d))])
    model = LogisticRegression(C=1.0, fit_intercept=False, max_iter=2000)
    model.fit(x, y, sample_weight=np.concatenate([weight, weight]))
    return model.coef_[0].astype(np.float64)


def _calibration(scores: np.ndarray) -> Calibration:
    q = np.percentile(scores, _LEVELS)
    # Strictly increasing, so the percentile lookup is well defined.
    q = np.maximum.accumulate(q) + 1e-9 * np.arange(len(q))
    return Calibration(levels=_LEVELS, quantiles=tuple(round(float(x), 6) for x in q))


def _fit_heads(
    z: np.ndarray, acc: _Pairs
) -> tuple[dict[str, Head], dict[str, HeadResult], dict[str, dict[str, float]]]:
    """Fits each head on its own training pairs; measures it on every held-out family."""
    pos = np.array([p[0] for p in acc.pairs])
    neg = np.array([p[1] for p in acc.pairs])
    head_of = np.array([p[2] for p in acc.pairs])
    kind = np.array([p[3] for p in acc.pairs])
    is_held = np.array([p[4] for p in acc.pairs])
    real_held = np.array([i for i, h in acc.real if h])

    heads: dict[str, Head] = {}
    results: dict[str, HeadResult] = {}
    cross: dict[str, dict[str, float]] = {}
    for dim in DIMENSIONS:
        tr, te = (head_of == dim) & ~is_held, (head_of == dim) & is_held
        w = _fit_head(z, pos[tr], neg[tr], kind[tr])
        diff = (z[pos] - z[neg]) @ w
        results[dim] = HeadResult(
            train_pairs=int(tr.sum()),
            heldout_pairs=int(te.sum()),
            train_accuracy=_accuracy(diff[tr]),
            heldout_accuracy=_accuracy(diff[te]),
            heldout_by_kind={k: _accuracy(diff[te & (kind == k)]) for k in sorted(set(kind[te]))},
        )
        cross[dim] = {f: _accuracy(diff[(head_of == f) & is_held]) for f in DIMENSIONS}
        heads[dim] = Head(
            name=dim,
            weights=w,
            negatives=HEAD_NEGATIVES[dim],
            heldout_accuracy=round(results[dim].heldout_accuracy, 4),
            calibration=_calibration(z[real_held] @ w),
        )
    return heads, results, cross


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fit_eval_critic(
    *,
    out_path: Path,
    embedder: Embedder,
    data_path: Path = DEFAULT_DATA,
    conversations: int | None = 600,
    contexts_per_side: int = 3,
    heldout_share: float = 0.2,
    seed: int = 13,
    cache_dir: Path | None = DEFAULT_CACHE,
) -> FitResult:
    """Fits the three heads, writes the frozen json to ``out_path`` and checks it loads."""
    start = time.monotonic()
    rng = random.Random(seed)
    convs = load_spc(data_path)
    rng.shuffle(convs)
    convs = convs[: conversations or len(convs)]
    n_held = max(2, round(len(convs) * heldout_share))
    held, train = convs[:n_held], convs[n_held:]
    acc = _build_pairs(train, held, contexts_per_side, rng)

    t0 = time.monotonic()
    feats = extract_features(acc.items, DiskCachedEncoder(embedder, cache_dir))
    embed_seconds = time.monotonic() - t0

    train_items = sorted({i for p in acc.pairs if not p[4] for i in p[:2]})
    mean = feats[train_items].mean(axis=0)
    std = feats[train_items].std(axis=0)
    std[std < 1e-6] = 1.0
    z = (feats - mean) / std
    heads, results, cross = _fit_heads(z, acc)

    seconds = time.monotonic() - start
    meta = {
        "data": {
            "file": Path(data_path).name,
            "sha256": _file_sha256(data_path),
            "conversations": len(convs),
            "train_conversations": len(train),
            "heldout_conversations": len(held),
            "seed": seed,
            "contexts_per_side": contexts_per_side,
            "heldout_indices": sorted(c.index for c in held),
        },
        "heldout": {d: asdict(r) for d, r in results.items()},
        "cross_accuracy": cross,
        "fit_seconds": round(seconds, 1),
        "calibration_note": "real held-out reply quantiles at anchor_levels map to anchor_values",
    }
    weights = RankerWeights(VERSION, embedder.model_id, FEATURES, mean, std, heads, meta)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(weights.to_dict(), indent=1) + "\n", encoding="utf-8")
    critic = PersonaChatCritic(embedder, out_path)  # the written file must load
    log.info("fitted %s in %.0f s (embedding %.0f s)", critic.model_id, seconds, embed_seconds)
    return FitResult(
        out_path=out_path,
        model_id=critic.model_id,
        conversations=len(convs),
        train_conversations=len(train),
        heldout_conversations=len(held),
        contexts={"train": sum(not h for _, h in acc.real), "heldout": sum(h for _, h in acc.real)},
        heads=results,
        cross_accuracy=cross,
        embed_seconds=embed_seconds,
        seconds=seconds,
    )
