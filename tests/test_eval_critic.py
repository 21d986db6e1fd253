"""The evaluation critic fitted on Synthetic-Persona-Chat (CC BY 4.0, Jandaghi et al. 2023).

Real MiniLM, the shipped weights, and held-out SPC conversations read from the shared data.
"""

from __future__ import annotations

import json
import random
from importlib import resources

import numpy as np
import pytest

from core.embeddings import Embedder
from learner.critic import CachedCritic, Critic
from learner.eval_critic import (
    FEATURES,
    AgreementReport,
    PersonaChatCritic,
    critic_agreement,
    load_weights,
)
from learner.fit_eval_critic import DEFAULT_DATA, FitResult, fit_eval_critic, load_spc
from learner.records import DIMENSIONS, CriticInput, Score

pytestmark = pytest.mark.skipif(not DEFAULT_DATA.exists(), reason="SPC data not present")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def critic(embedder: Embedder) -> PersonaChatCritic:
    return PersonaChatCritic(embedder)


@pytest.fixture(scope="module")
def heldout_contexts() -> list[tuple[CriticInput, str, str]]:
    """(real item, a line from another held-out conversation, a truncated real reply)."""
    meta = load_weights().meta["data"]
    held = set(meta["heldout_indices"])
    convs = [c for c in load_spc() if c.index in held]
    rng = random.Random(3)
    out = []
    for conv in convs[:12]:
        # Bot = User 2, replying to User 1 (whose facts are the background); a turn
        # whose real reply is long enough to truncate.
        turns = [
            t for t, (s, x) in enumerate(conv.lines) if s == 1 and t >= 3 and len(x.split()) >= 6
        ]
        if not turns:
            continue
        t = rng.choice(turns)
        history = tuple(("assistant" if s == 1 else "user", x) for s, x in conv.lines[:t])
        item = CriticInput("the user", " ".join(conv.personas[0]), history, conv.lines[t][1])
        other = next(c for c in convs if c.index != conv.index and len(c.lines) > t)
        words = item.reply.split()
        out.append((item, other.lines[t][1], " ".join(words[: len(words) // 3])))
    assert len(out) >= 8
    return out


def _variant(item: CriticInput, reply: str) -> CriticInput:
    return CriticInput(item.user_name, item.background, item.history, reply)


def test_shipped_weights_load_and_carry_attribution(critic: PersonaChatCritic) -> None:
    path = resources.files("learner").joinpath("data", "eval_critic.json")
    raw = path.read_text("utf-8")
    assert len(raw.encode()) < 200_000
    data = json.loads(raw)
    assert "CC BY 4.0" in data["attribution"] and "2312.10007" in data["attribution"]
    assert tuple(data["features"]) == FEATURES
    weights = load_weights()
    assert critic.model_id == f"spc-ranker-v1:{weights.digest()}"
    assert isinstance(critic, Critic)
    for dim in DIMENSIONS:
        head = weights.heads[dim]
        assert head.weights.shape == (len(FEATURES),)
        assert 0.6 < head.heldout_accuracy <= 1.0
        quantiles = np.asarray(head.calibration.quantiles)
        assert np.all(np.diff(quantiles) > 0)
        # The real held-out median maps to 3.5 by construction.
        assert head.calibration.expected(np.array([quantiles[20]]))[0] == pytest.approx(3.5)


def test_real_reply_outranks_other_conversation(critic, heldout_contexts) -> None:
    real = critic.score_batch([c[0] for c in heldout_contexts])
    other = critic.score_batch([_variant(c[0], c[1]) for c in heldout_contexts])
    real_rel = np.mean([s.value("rel") for s in real])
    other_rel = np.mean([s.value("rel") for s in other])
    assert real_rel > other_rel
    wins = sum(r.value("rel") > o.value("rel") for r, o in zip(real, other, strict=True))
    assert wins > len(real) / 2


def test_echo_and_truncation_score_lower(critic, heldout_contexts) -> None:
    items = [c[0] for c in heldout_contexts]
    real = critic.score_batch(items)
    echo = critic.score_batch([_variant(i, i.last_user_message) for i in items])
    cut = critic.score_batch([_variant(c[0], c[2]) for c in heldout_contexts])

    def mean(scores: list[Score], dim: str) -> float:
        return float(np.mean([s.value(dim) for s in scores]))

    assert mean(echo, "int") < mean(real, "int") - 0.5
    assert mean(cut, "val") < mean(real, "val") - 0.5
    assert mean(cut, "int") < mean(real, "int")


def test_empty_reply_scores_ones(critic, heldout_contexts) -> None:
    item = heldout_contexts[0][0]
    score = critic.score_batch([_variant(item, "   ")])[0]
    assert (score.rel, score.int, score.val) == (1, 1, 1)
    assert score.reasons == {d: "the reply is empty" for d in DIMENSIONS}
    assert score.critic_model_id == critic.model_id


def test_no_history_and_no_background_still_scored(critic) -> None:
    item = CriticInput("Ana", "", (), "Hi! What kind of music do you like these days?")
    score = critic.score_batch([item])[0]
    assert score.scored and all(1 <= score.get(d) <= 5 for d in DIMENSIONS)


def test_batch_of_many_matches_single_scoring(critic, heldout_contexts) -> None:
    items = []
    for item, other, cut in heldout_contexts:
        for reply in (item.reply, other, cut, item.last_user_message, "Okay."):
            items.append(_variant(item, reply))
    items = items * 5  # repeated texts are embedded once
    scores = critic.score_batch(items)
    assert len(scores) == len(items)
    assert all(s.scored and all(1 <= s.get(d) <= 5 for d in DIMENSIONS) for s in scores)
    raw = json.loads(scores[0].raw)
    assert set(raw["features"]) == set(FEATURES)
    assert all(s.reasons[d] for s in scores for d in DIMENSIONS)
    alone = critic.score_batch([items[7]])[0]
    assert alone.expected == pytest.approx(scores[7].expected, abs=1e-4)
    # Behind the shared cache wrapper it answers the same.
    cached = CachedCritic(critic).score_batch(items[:5])
    for c, s in zip(cached, scores[:5], strict=True):
        assert c.expected == pytest.approx(s.expected)


def test_reasons_name_what_moved_the_score(critic, heldout_contexts) -> None:
    item = heldout_contexts[0][0]
    score = critic.score_batch([_variant(item, item.last_user_message)])[0]
    assert score.reasons["int"].startswith(f"interest {score.int}: above ")
    assert "Persona-Chat" in score.reasons["int"]
    assert "(" in score.reasons["int"]  # a measured value is quoted


def test_critic_agreement(critic, heldout_contexts) -> None:
    items = [_variant(c[0], r) for c in heldout_contexts for r in (c[0].reply, c[1], c[2])]
    scores = critic.score_batch(items)
    same = critic_agreement(scores, scores)
    assert isinstance(same, AgreementReport)
    assert same.n == len(items) and same.pairs > 0
    assert same.pair_agreement == 1.0
    assert all(v == pytest.approx(1.0) for v in same.spearman.values())
    flipped = [
        Score(
            rel=6 - s.rel,
            int=6 - s.int,
            val=6 - s.val,
            expected={d: 6 - s.expected[d] for d in DIMENSIONS},
        )
        for s in scores
    ]
    groups = [str(i // 3) for i in range(len(items))]
    opposite = critic_agreement(scores, flipped, groups=groups)
    assert opposite.pair_agreement == 0.0
    assert opposite.mean_spearman == pytest.approx(-1.0)
    assert opposite.pairs <= len(items)  # only pairs within a context of 3 replies
    unscored = critic_agreement([*scores, Score()], [*scores, scores[0]])
    assert unscored.n == len(items)


def test_fit_on_tiny_subsample(embedder, tmp_path) -> None:
    out = tmp_path / "tiny.json"
    result = fit_eval_critic(
        out_path=out, embedder=embedder, conversations=40, contexts_per_side=2, cache_dir=None
    )
    assert isinstance(result, FitResult)
    assert result.train_conversations == 32 and result.heldout_conversations == 8
    for dim in DIMENSIONS:
        head = result.heads[dim]
        assert head.train_pairs > 0 and head.heldout_pairs > 0
        assert 0.0 <= head.heldout_accuracy <= 1.0
        assert 0.0 <= head.train_accuracy <= 1.0
    tiny = PersonaChatCritic(embedder, out)
    assert tiny.model_id == result.model_id
    assert tiny.score_batch([CriticInput("x", "I like tea.", (("user", "Hi"),), "Tea?")])[0].scored
