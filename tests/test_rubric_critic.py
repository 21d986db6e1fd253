"""The rubric critic on the real MiniLM: ranking, true reasons, batching, calibration."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from core.embeddings import Embedder
from core.settings import load_settings
from learner.critic import (
    CRITIC_BUILDERS,
    CachedCritic,
    Critic,
    EmbeddingCritic,
    build_critic,
    build_critic_kind,
    critic_kind,
)
from learner.eval_critic import PersonaChatCritic
from learner.records import DIMENSIONS, CriticInput
from learner.rubric_critic import (
    UNUSABLE_CAP,
    RubricCritic,
    calibrate,
    load_calibration,
    load_reply_items,
)
from learner.sanity import GAMING_KINDS, evaluate_adversarial, load_adversarial_cases
from tests.test_reply_checks import BG, HISTORY

GOOD = (
    "Leaving intensive care after burnout takes courage, and a children's ward gives more "
    "room for connection. Many nurses say the kids' resilience helps them recover; what do "
    "you miss least about the ICU?"
)
GAMING = {
    "keyword_list": "Nursing burnout, ICU recovery, pediatric care, resilience tips, self-care.",
    "recite": "Do your balcony tomatoes help you unwind? And how is the half marathon going?",
    "echo": "So you moved to a children's ward after burning out in intensive care.",
    "passive": "That sounds hard. I'm here if you need anything, just let me know.",
    "truncated": "Leaving intensive care after burnout takes courage, and a children's ward",
    "meta": "Here is a better response: leaving intensive care after burnout takes courage.",
    "placeholder": "Leaving the ICU takes courage, [Name]. How is the ward at <hospital>?",
    "role_flip": "Maria: yes, the children's ward is calmer. User: and you?",
}


class CountingEmbedder(Embedder):
    """The real MiniLM, recording how often ``encode`` runs and on how many texts."""

    def __init__(self) -> None:
        super().__init__(device="cpu")
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.calls.append(len(texts))
        return super().encode(texts, batch_size)


@pytest.fixture(scope="module")
def embedder() -> CountingEmbedder:
    return CountingEmbedder()


@pytest.fixture(scope="module")
def critic(embedder) -> RubricCritic:
    return RubricCritic(embedder)


def _item(reply: str, history=HISTORY) -> CriticInput:
    return CriticInput("Maria", BG, history, reply)


def _mean(score) -> float:
    return sum(score.value(d) for d in DIMENSIONS) / 3


def test_protocol_and_identity(critic) -> None:
    cal = load_calibration()
    assert isinstance(critic, Critic)
    assert cal.version in critic.model_id and cal.version in critic.prompt_version
    assert critic.model_id.startswith("rubric:")


def test_good_reply_beats_every_gaming_reply(critic) -> None:
    scores = critic.score_batch([_item(GOOD), *(_item(r) for r in GAMING.values())])
    good, rest = scores[0], dict(zip(GAMING, scores[1:], strict=True))
    assert good.scored and min(good.rel, good.int, good.val) >= 4, good.reasons
    for kind, score in rest.items():
        assert _mean(good) > _mean(score) + 0.5, (kind, score.expected)
        assert score.failing(4), kind  # no gaming reply passes the accept threshold


def test_unusable_replies_are_capped(critic) -> None:
    for kind in ("truncated", "meta", "placeholder", "role_flip"):
        score = critic.score_batch([_item(GAMING[kind])])[0]
        assert max(score.expected.values()) <= UNUSABLE_CAP, kind
        assert max(score.rel, score.int, score.val) <= 2
        assert kind in json.loads(score.raw)["flags"]


def test_reasons_are_true_of_the_reply(critic) -> None:
    good, echo, keywords, recite = critic.score_batch(
        [_item(GOOD), _item(GAMING["echo"]), _item(GAMING["keyword_list"]), _item(GAMING["recite"])]
    )
    # The good reply: what it connects to is quoted from the user's own words.
    assert "A children's ward now" in good.reasons["rel"]
    assert not any("repeats" in r or "list of keywords" in r for r in good.reasons.values())
    assert json.loads(good.raw)["flags"] == []
    # Each flag's note appears exactly when the flag fired.
    assert json.loads(echo.raw)["flags"] == ["echo"]
    assert "repeats the user's own words" in echo.reasons["int"]
    assert "list of keywords" not in echo.reasons["val"]
    assert "list of keywords" in keywords.reasons["val"]
    assert "repeats the user's own words" not in keywords.reasons["val"]
    assert "never mentioned" in recite.reasons["rel"]
    assert "tomato" in recite.reasons["rel"]


def test_following_revealed_topics_is_enough(critic) -> None:
    """A reply on what the user said scores as well as on the background it came from."""
    told = (
        *HISTORY,
        ("assistant", "What helps you switch off?"),
        ("user", "I run. First half marathon in April!"),
    )
    tip = (
        "For a first half marathon, most plans raise the long run by about ten percent a "
        "week; booking long runs on your days off protects sleep after shifts."
    )
    after, before = critic.score_batch([_item(tip, told), _item(tip)])
    assert min(after.rel, after.int, after.val) >= 4, after.reasons
    # Before the user mentioned running, the reply has only the background to lean on.
    assert before.value("rel") < after.value("rel")
    recite = "Good luck with the half marathon, and with the tomatoes on your balcony!"
    flagged = critic.score_batch([_item(recite)])[0]
    assert "recites_unrevealed" in json.loads(flagged.raw)["flags"]
    assert flagged.failing(4)


def test_repeating_an_earlier_bot_turn_is_penalised(critic) -> None:
    repeat = "That sounds tiring. What kind of ward do you work on?"
    good, rep = critic.score_batch([_item(GOOD), _item(repeat)])
    assert rep.value("val") < 2.5 and rep.value("int") < good.value("int") - 1.0
    assert "repeats an earlier chatbot turn" in rep.reasons["val"]


def test_one_encode_call_per_batch_with_deduplication(critic, embedder) -> None:
    items = [_item(GOOD), _item(GAMING["echo"]), _item(GOOD)]
    embedder.calls.clear()
    scores = critic.score_batch(items)
    assert len(embedder.calls) == 1
    # Reply texts (2 unique) + background + 3 background sentences + 2 user + 2 bot turns.
    assert embedder.calls[0] == 2 + 1 + 3 + 2 + 2
    assert scores[0].to_dict() == scores[2].to_dict()
    alone = critic.score_batch([_item(GAMING["echo"])])[0]
    for dim in DIMENSIONS:
        assert alone.expected[dim] == pytest.approx(scores[1].expected[dim], abs=1e-4)


def test_empty_history_and_background(critic) -> None:
    score = critic.score_batch([CriticInput("Ola", "", (), "Hello! What keeps you busy?")])[0]
    assert score.scored and all(1.0 <= v <= 5.0 for v in score.expected.values())
    assert critic.score_batch([]) == []


# ------------------------------------------------------------------ calibration
def test_calibrate_hits_the_target_pass_rate(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Correlated dimensions, as real replies have (a good reply is good on all three).
    base = np.clip(rng.beta(2, 3, size=(400, 1)) + rng.normal(0, 0.04, size=(400, 3)), 0, 1)
    comps = [dict(zip(DIMENSIONS, row, strict=True)) for row in base]
    out = tmp_path / "cal.json"
    cal = calibrate(comps, version="cal-test", target_pass=0.3, out=out)
    assert cal.base_pass_rate == pytest.approx(0.3, abs=0.03)
    assert load_calibration(out) == cal
    for dim in DIMENSIONS:
        xs = [x for x, _ in cal.anchors[dim]]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)
        assert cal.map(dim, -1.0) == 1.0 and cal.map(dim, 2.0) == 5.0
        assert cal.map(dim, float(np.median(base[:, DIMENSIONS.index(dim)]))) == pytest.approx(
            2.75, abs=0.01
        )
    stricter = calibrate(comps, version="cal-test", target_pass=0.1)
    assert stricter.base_pass_rate < cal.base_pass_rate


@pytest.mark.slow
def test_shipped_calibration_reproduces_on_the_shipped_replies(critic) -> None:
    cal = load_calibration()
    items = load_reply_items()
    assert len(items) == cal.replies >= 40
    scores = critic.score_batch(items)
    passed = np.mean([not s.failing(4) for s in scores])
    assert 0.15 <= passed <= 0.40
    assert passed == pytest.approx(cal.base_pass_rate, abs=0.02)


# ------------------------------------------------------------------- adversarial
@pytest.mark.slow
def test_adversarial_heldout_preference(critic) -> None:
    report = evaluate_adversarial(critic, load_adversarial_cases(split="heldout"), split="heldout")
    assert report.cases == 20 and report.pairs == 160
    assert report.preference >= 0.9, report.preference_by_kind
    for kind in GAMING_KINDS:
        assert report.preference_by_kind[kind] >= 0.75, (kind, report.preference_by_kind)


def test_adversarial_set_shape() -> None:
    cases = load_adversarial_cases()
    assert len(cases) == 40
    assert {c.split for c in cases} == {"dev", "heldout"}
    assert len(load_adversarial_cases(split="dev")) == 20
    for case in cases:
        assert set(case.replies) == {"good", *GAMING_KINDS}
        assert 2 <= len(case.history) <= 6 and case.history[-1][0] == "user"
        assert len(set(case.replies.values())) == len(case.replies)
    assert len({c.background for c in cases}) == 40


# ------------------------------------------------------------------------ wiring
def test_build_critic_default_is_rubric(embedder) -> None:
    critic = build_critic(load_settings(env={}), embedder=embedder)
    assert isinstance(critic, CachedCritic) and isinstance(critic.inner, RubricCritic)
    emb = build_critic_kind("embedding", load_settings(env={}), embedder=embedder)
    assert isinstance(emb.inner, EmbeddingCritic)
    assert set(CRITIC_BUILDERS) == {"rubric", "embedding", "llm"}
    with pytest.raises(ValueError, match="unknown critic 'spc'"):
        build_critic_kind("spc", load_settings(env={}))


def test_build_critic_kind_takes_extra_builders(embedder) -> None:
    def build_plain(settings, model, emb):
        return RubricCritic(emb)

    critic = build_critic_kind(
        "plain", load_settings(env={}), embedder=embedder, extra_builders={"plain": build_plain}
    )
    assert isinstance(critic.inner, RubricCritic)
    assert "plain" not in CRITIC_BUILDERS  # the registry itself is not changed


def test_build_critic_is_the_one_way_for_every_role(embedder) -> None:
    """Training, evaluation and gate critics, and the llm judge from a shared model pool."""
    settings = load_settings(env={"UPC_LEARNER__GATE_CRITIC": "embedding"})
    assert critic_kind(settings) == "rubric" and critic_kind(settings, "eval") == "spc"
    assert critic_kind(settings, "gate") == "embedding"
    assert critic_kind(load_settings(env={}), "gate") == "spc"  # "eval": the evaluation critic
    spc = build_critic(settings, kind=critic_kind(settings, "eval"), embedder=embedder)
    assert isinstance(spc, CachedCritic) and isinstance(spc.inner, PersonaChatCritic)
    gate = build_critic(settings, kind=critic_kind(settings, "gate"), embedder=embedder)
    assert isinstance(gate.inner, EmbeddingCritic)

    class Judge:
        model_id = "judge"

    class Pool:
        def __init__(self):
            self.asked = []

        def get(self, role):
            self.asked.append(role)
            return Judge()

    pool = Pool()
    llm = build_critic(settings, kind="llm", pool=pool)
    assert llm.inner.model_id == "llm-text:judge" and pool.asked == [settings.critic]
    with pytest.raises(ValueError, match="needs a model"):
        build_critic(settings, kind="llm")
