"""The critic: parser shapes, logit scoring on a tiny real model, embedding critic, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatbot.cli import main
from core.embeddings import Embedder
from core.local_model import LocalModel
from core.settings import load_settings
from learner.critic import (
    CachedCritic,
    EmbeddingCritic,
    LogitCritic,
    TextJudgeCritic,
    _common_prefix_len,
    build_critic,
    build_critic_kind,
    critic_messages,
)
from learner.critic_parse import parse_judgement
from learner.records import DIMENSIONS, CriticInput
from learner.rubric_critic import RubricCritic
from learner.sanity import evaluate_critic, load_sanity_cases


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    """A tiny randomly initialised Llama with the real SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tok


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


BG = (
    "Maria Lopez, 46, is a pediatric nurse in Seville who moved from intensive care to a "
    "children's ward after burning out. She grows tomatoes on her balcony and trains for "
    "a half marathon."
)
HISTORY = (
    ("assistant", "Hi! How has your week been?"),
    ("user", "Hi, I'm Maria. Long shift at the hospital, I'm a nurse."),
    ("assistant", "That sounds tiring. What kind of ward do you work on?"),
    ("user", "A children's ward. I left intensive care because I burnt out."),
)
GOOD = (
    "Leaving intensive care after burnout takes courage, and a children's ward gives more "
    "room for connection. Many nurses say the kids' resilience helps them recover too."
)


def _item(reply: str) -> CriticInput:
    return CriticInput("Maria", BG, HISTORY, reply)


# ----------------------------------------------------------------- parser
PARSABLE = [
    ("rel: 4 because fits her job\nint: 3 because fine\nval: 2 because thin", (4, 3, 2)),
    ("Rel: 5\nInt: 4\nVal: 3", (5, 4, 3)),
    (
        "**Relevance**: 4/5 - about nursing\n**Interest**: 3/5 - ok\n**Value**: 2/5 - shallow",
        (4, 3, 2),
    ),
    (
        "1. Relevance to background: 4 (mentions nursing)\n2. Interest: 3 (ok)\n3. Value: 2",
        (4, 3, 2),
    ),
    ("Rel 4, Int 3, Val 2", (4, 3, 2)),
    ("Scores - rel=5; int=4; val=4.", (5, 4, 4)),
    ('{"rel": 3, "int": 2, "val": 1}', (3, 2, 1)),
    (
        '```json\n{"rel": {"score": 4, "reason": "x"}, "int": {"score": 2}, "val": 5}\n```',
        (4, 2, 5),
    ),
    (
        '{"scores": {"relevance": 2, "interest": 2, "value": 3}, "reasons": {"relevance": "no"}}',
        (2, 2, 3),
    ),
    (
        "Here is my judgement.\nrel: 4 out of 5 because it mentions her ward\n"
        "int: 3 out of 5\nval: 3 out of 5",
        (4, 3, 3),
    ),
    ("rel: 4 because it fits her interest in 3D printing\nint: 2\nval: 3", (4, 2, 3)),
    ("- relevance: 1 (off topic)\n- interest: 1\n- value: 1", (1, 1, 1)),
]
UNPARSABLE = [
    "",
    "   ",
    "The reply is quite nice and friendly.",
    "rel: 4.5 because\nint: 3\nval: 3",
    "Relevance: 8/10\nInterest: 7/10\nValue: 6/10",
    "rel: 0\nint: 3\nval: 3",
    "rel: 6\nint: 3\nval: 3",
    "rel: 4\nint: 3",
    '{"rel": "high", "int": 3, "val": 3}',
    "asdkjh 12 34 5 !!!",
    "rel: four\nint: three\nval: two",
]


@pytest.mark.parametrize(("text", "expected"), PARSABLE)
def test_parser_reads_judge_shapes(text: str, expected: tuple[int, int, int]) -> None:
    result = parse_judgement(text)
    assert result.ok, result.error
    assert tuple(result.scores[d] for d in DIMENSIONS) == expected


@pytest.mark.parametrize("text", UNPARSABLE)
def test_parser_never_invents_scores(text: str) -> None:
    result = parse_judgement(text)
    assert not result.ok
    assert result.error


def test_parser_keeps_reasons() -> None:
    result = parse_judgement(
        "rel: 2 because it ignores her job\nint: 3 because ok\nval: 1 since empty"
    )
    assert result.reasons == {"rel": "it ignores her job", "int": "ok", "val": "empty"}


# ------------------------------------------------------------ logit critic
def test_logit_scores_are_valid_distributions(tiny) -> None:
    model, tok = tiny
    critic = LogitCritic.from_hf(model, tok, "tiny", batch_size=4)
    items = [_item(GOOD), _item("How can I help you today?"), _item("Saturn has rings.")]
    scores = critic.score_batch(items)
    assert len(scores) == 3
    for score in scores:
        assert score.scored
        assert score.critic_model_id == "llm-logit:tiny"
        assert score.tokens > 0
        for dim in DIMENSIONS:
            dist = score.distribution[dim]
            assert len(dist) == 5
            assert all(p >= 0 for p in dist)
            assert sum(dist) == pytest.approx(1.0, abs=1e-6)
            expected = sum((k + 1) * p for k, p in enumerate(dist))
            assert score.expected[dim] == pytest.approx(expected)
            assert 1 <= score.get(dim) <= 5
            assert score.get(dim) == int(expected + 0.5)
    # Deterministic, and independent of batch composition (left padding + positions).
    again = critic.score_batch([items[1]])[0]
    for dim in DIMENSIONS:
        assert again.distribution[dim] == pytest.approx(scores[1].distribution[dim], abs=1e-4)


def test_shared_rubric_prefix_gives_the_same_scores(tiny) -> None:
    model, tok = tiny
    items = [
        _item(GOOD),
        _item("How can I help you today?"),
        CriticInput(user_name="Ole", background="Ole fixes boats.", history=(), reply="Hi."),
    ]
    texts = [
        tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in critic_messages(i)],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in items
    ]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert _common_prefix_len(ids) > 200  # the whole rubric is shared by every item
    shared = LogitCritic.from_hf(model, tok, "tiny", batch_size=4).score_batch(items)
    unshared = LogitCritic.from_hf(model, tok, "tiny", share_prefix=False).score_batch(items)
    for a, b in zip(shared, unshared, strict=True):
        assert a.tokens == b.tokens
        for dim in DIMENSIONS:
            assert a.distribution[dim] == pytest.approx(b.distribution[dim], abs=1e-4)


def test_common_prefix_leaves_every_row_a_token() -> None:
    assert _common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2
    assert _common_prefix_len([[1, 2, 3, 4], [1, 2, 9]]) == 2
    assert _common_prefix_len([[5], [5, 6]]) == 0
    assert _common_prefix_len([[1, 2], [3, 4]]) == 0


def test_logit_critic_through_local_model(tiny) -> None:
    model, tok = tiny
    local = LocalModel("tiny", model=model, tokenizer=tok, device="cpu", model_id="tiny")
    try:
        settings = load_settings(env={}, learner__critic="llm")
        critic = build_critic(settings, model=local)
        assert isinstance(critic, CachedCritic)
        assert isinstance(critic.inner, LogitCritic)
        score = critic.score_batch([_item(GOOD)])[0]
        assert score.scored and score.distribution is not None
    finally:
        local.close()


def test_text_judge_marks_garbage_unscored_after_reasks(tiny) -> None:
    """A random tiny model never answers in the format: 1 ask + 3 re-asks, then unscored."""

    model, tok = tiny
    local = LocalModel("tiny", model=model, tokenizer=tok, device="cpu", model_id="tiny")
    try:
        critic = TextJudgeCritic(local, max_reasks=3, max_new_tokens=8)
        scores = critic.score_batch([_item(GOOD), _item("Hello.")])
    finally:
        local.close()
    for score in scores:
        assert not score.scored
        assert score.rel is None and score.int is None and score.val is None
        assert score.attempts == 4
        assert score.raw.count("\n---\n") == 3
        assert score.tokens > 0


# -------------------------------------------------------- embedding critic
@pytest.mark.slow
def test_embedding_critic_ranks_and_explains(embedder) -> None:
    critic = EmbeddingCritic(embedder)
    good, passive, off, rep = critic.score_batch(
        [
            _item(GOOD),
            _item("How can I help you today?"),
            _item("Saturn's rings are mostly water ice and may be young."),
            _item("That sounds tiring. What kind of ward do you work on?"),
        ]
    )
    for worse in (passive, off, rep):
        assert good.value("int") > worse.value("int")
        assert good.value("val") > worse.value("val")
    assert good.value("rel") > off.value("rel")
    assert "stock offer" in passive.reasons["val"]
    assert "repeats" in rep.reasons["val"]
    assert json.loads(good.raw)["novel_words"] > 5


@pytest.mark.slow
def test_embedding_critic_beats_chance_on_sanity_subset(embedder) -> None:
    cases = load_sanity_cases()[::6]  # 10 cases across all personas
    report = evaluate_critic(EmbeddingCritic(embedder), cases)
    assert report.cases == 10
    for dim in DIMENSIONS:
        assert report.accuracy[dim] >= 0.75, report.accuracy


def test_sanity_set_shape() -> None:
    cases = load_sanity_cases()
    assert len(cases) >= 60
    for case in cases:
        assert set(case.replies) == {"good", "passive", "off_topic", "repetitive"}
        assert case.history and case.history[-1][0] == "user"
        assert len(case.background.split()) >= 25
    assert len({c.replies["good"] for c in cases}) == len(cases)


@pytest.mark.slow
def test_cache_returns_equal_scores_without_recomputing(embedder) -> None:
    critic = build_critic(load_settings(env={}), embedder=embedder)
    first = critic.score_batch([_item(GOOD), _item("Hello.")])
    second = critic.score_batch([_item("Hello."), _item(GOOD)])
    assert critic.hits == 2
    assert second[1].to_dict() | {"tokens": 0} == first[0].to_dict() | {"tokens": 0}
    assert second[0].rel == first[1].rel


def test_build_critic_rejects_unknown_and_needs_model() -> None:
    settings = load_settings(env={}, learner__critic="llm")
    with pytest.raises(ValueError, match="needs a model"):
        build_critic(settings)
    with pytest.raises(ValueError, match="unknown critic"):
        build_critic_kind("nonsense", settings)


def test_default_critic_is_rubric(embedder) -> None:
    critic = build_critic(load_settings(env={}), embedder=embedder)
    assert isinstance(critic, CachedCritic) and isinstance(critic.inner, RubricCritic)
    assert critic.model_id.startswith("rubric:")


def test_sanity_cli_reports_embedding_critic(tmp_path, capsys) -> None:
    config = tmp_path / "upc.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    argv = ["--config", str(config), "learn", "sanity", "--critic", "embedding"]
    assert main([*argv, "--every", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == 10 and report["pairs_per_dimension"] == 30
    assert report["critic_model_id"].startswith("embedding")
    assert report["mean_accuracy"] > 0.75  # well above chance (0.5) on the sanity set
    assert main([*argv, "--every", "0"]) == 2


def test_sanity_cli_reports_rubric_critic_and_adversarial_table(tmp_path, capsys) -> None:
    config = tmp_path / "upc.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    argv = ["--config", str(config), "learn", "sanity", "--every", "4"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["critic_model_id"].startswith("rubric:")  # the default
    assert report["mean_accuracy"] > 0.9
    for split in ("dev", "heldout"):
        adv = report["adversarial"][split]
        assert adv["split"] == split and adv["cases"] == 5 and adv["pairs"] == 40
        assert adv["preference"] > 0.85
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "adversarial set" in text and "recite_unrevealed" in text and "heldout" in text
