"""Evaluation metrics on hand-built data (worked examples computed by hand below)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.embeddings import Embedder
from learner.metrics import (
    ReplyContext,
    Trait,
    aloe_fit,
    background_similarity,
    discovery,
    is_passive,
    is_question,
    lexical_mention,
    linear_fit,
    mean_ci,
    passivity_rate,
    per_turn_al,
    question_rate,
    repetition_scores,
    reply_perplexity,
    runner_from_hf,
    spearman,
    structured_traits,
)
from personas.records import Traits


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


# ------------------------------------------------------------------------ ALOE


def test_per_turn_al_and_improvement_rate_worked_example() -> None:
    # Three users, turns 2..5; user C was unscored at turn 3 and its dialogue ended early.
    dialogues = [
        {2: 3.0, 3: 3.0, 4: 4.0, 5: 4.0},
        {2: 2.0, 3: 4.0, 4: 3.0, 5: 5.0},
        {2: 4.0, 3: None, 4: 2.0},
    ]
    al = per_turn_al(dialogues)
    # AL(2) = (3+2+4)/3 = 3; AL(3) = (3+4)/2 = 3.5; AL(4) = (4+3+2)/3 = 3; AL(5) = (4+5)/2 = 4.5
    assert al == pytest.approx({2: 3.0, 3: 3.5, 4: 3.0, 5: 4.5})

    fit = aloe_fit(al)
    # k - mean(k) = -1.5, -0.5, 0.5, 1.5 (sum of squares 5); mean AL = 3.5, so
    # AL - mean = -0.5, 0, -0.5, 1.0 and the cross sum is 0.75 + 0 - 0.25 + 1.5 = 2.0.
    # IR = 2.0 / 5 = 0.4.
    assert fit.ir == pytest.approx(0.4)
    # Fitted line: 3.5 + 0.4 (k - 3.5) = 2.9, 3.3, 3.7, 4.1; residuals 0.1, 0.2, -0.7, 0.4;
    # SS_res = 0.01 + 0.04 + 0.49 + 0.16 = 0.70; SS_tot = 0.25 + 0 + 0.25 + 1.0 = 1.5.
    assert fit.r2 == pytest.approx(1 - 0.70 / 1.5)
    # Min-max normalised AL: (AL - 3) / 1.5 = 0, 1/3, 0, 1 -> every deviation scales by
    # 1/1.5, so N-IR = 0.4 / 1.5.
    assert fit.n_ir == pytest.approx(0.4 / 1.5)
    assert fit.turns == (2, 3, 4, 5)
    assert fit.al == pytest.approx((3.0, 3.5, 3.0, 4.5))


def test_aloe_flat_short_and_bad_input() -> None:
    flat = aloe_fit({2: 3.0, 3: 3.0, 4: 3.0})
    assert flat.ir == pytest.approx(0.0) and flat.n_ir == 0.0 and flat.r2 is None
    one = aloe_fit({2: 4.0})
    assert one.ir is None and one.n_ir is None and one.r2 is None
    assert per_turn_al([]) == {}
    slope, intercept, r2 = linear_fit([1, 2, 3], [2, 4, 6])
    assert (slope, intercept, r2) == pytest.approx((2.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        linear_fit([1], [1])
    with pytest.raises(ValueError):
        linear_fit([2, 2], [1, 3])


# -------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_covers_true_mean_about_95_percent() -> None:
    rng = np.random.default_rng(2024)
    true_mean, covered, trials = 3.7, 0, 200
    for trial in range(trials):
        sample = rng.normal(true_mean, 0.8, size=60)
        ci = mean_ci(sample.tolist(), n_boot=1000, seed=trial)
        assert ci.low <= ci.mean <= ci.high
        covered += ci.low <= true_mean <= ci.high
    coverage = covered / trials
    # Binomial sd at 95% over 200 trials is 1.5 points; the percentile bootstrap runs a bit
    # narrow at n = 60, so accept 89%..99%.
    assert 0.89 <= coverage <= 0.99, coverage


def test_mean_ci_seeded_and_edge_cases() -> None:
    data = [1.0, 2.0, 2.0, 5.0, 4.0, 3.0]
    assert mean_ci(data, seed=3) == mean_ci(data, seed=3)
    assert mean_ci(data, seed=3).mean == pytest.approx(17 / 6)
    wide = mean_ci(data, confidence=0.99, seed=3)
    narrow = mean_ci(data, confidence=0.5, seed=3)
    assert wide.high - wide.low > narrow.high - narrow.low
    empty = mean_ci([])
    assert empty.mean is None and empty.n == 0
    single = mean_ci([4.0])
    assert (single.mean, single.low, single.high) == (4.0, 4.0, 4.0)
    with pytest.raises(ValueError):
        mean_ci(data, confidence=1.5)


# -------------------------------------------------------------------- discovery

TRAITS = Traits(
    occupation="army lieutenant",
    education="earned a master's in strategic studies",
    hobbies=("collecting stamps", "photography", "volunteering at an animal shelter"),
    personality=("frugal",),
)


def test_structured_traits_and_lexical_mentions() -> None:
    traits = structured_traits(TRAITS)
    assert [t.kind for t in traits] == ["occupation", "education", "hobby", "hobby", "hobby"]
    assert traits[0] == Trait("occupation", "army lieutenant")
    assert structured_traits(Traits()) == []
    assert lexical_mention("army lieutenant", "Life in the Army must be tough.")
    assert lexical_mention("collecting stamps", "Which stamp is the rarest you own?")
    # Generic words ("earned", "master's", "studies") do not count.
    assert not lexical_mention("earned a master's in strategic studies", "What did you study?")
    assert lexical_mention("earned a master's in strategic studies", "Strategy is fascinating.")
    assert not lexical_mention("volunteering at an animal shelter", "Do you have a dog?")
    assert not lexical_mention("yoga", "")


def test_discovery_rate_replies_memory_and_embedding(embedder) -> None:
    traits = structured_traits(TRAITS)
    replies = [
        "Hello! Leading soldiers in the army must teach you a lot about people.",
        "What kind of camera do you shoot with?",
    ]
    memory = ["collects stamps from Eastern Europe"]
    lexical_only = discovery(traits, replies, memory)
    by = {h.trait.text: h for h in lexical_only.hits}
    assert by["army lieutenant"].in_replies and by["army lieutenant"].how == "lexical"
    assert by["collecting stamps"].in_memory and not by["collecting stamps"].in_replies
    assert not by["photography"].found  # a paraphrase needs the embedding match
    assert lexical_only.rate == pytest.approx(2 / 5)
    assert lexical_only.reply_rate == pytest.approx(1 / 5)

    full = discovery(traits, replies, memory, embedder=embedder)
    by = {h.trait.text: h for h in full.hits}
    photo = by["photography"]
    assert photo.in_replies and photo.how == "embedding" and photo.similarity >= 0.5
    assert not by["volunteering at an animal shelter"].found
    assert not by["earned a master's in strategic studies"].found
    assert (full.found, full.traits) == (3, 5)
    assert full.rate == pytest.approx(3 / 5) and full.reply_rate == pytest.approx(2 / 5)
    # A stricter threshold loses the paraphrase; no traits gives no rate.
    assert discovery(traits, replies, memory, embedder=embedder, threshold=0.9).found == 2
    assert discovery([], replies).rate is None


def test_background_similarity_ranks_on_topic_replies_higher(embedder) -> None:
    background = "Oksana is an army lieutenant from Kharkiv who collects stamps."
    sims = background_similarity(
        embedder,
        ["Leading a platoon in the army must be demanding.", "I like pizza with pineapple."],
        background,
    )
    assert len(sims) == 2 and sims[0] > sims[1] + 0.2
    assert background_similarity(embedder, [], background) == []


# ------------------------------------------------------------------- detectors


@pytest.mark.parametrize(
    "text",
    [
        "Hello! How can I help you today?",
        "how may I assist you?",
        "Is there anything else I can do for you?",
        "As an AI, I don't have hobbies.",
        "I'm here to help with whatever you need.",
        "Let me know if you need more information.",
        "What can I do for you?",
        "I don\u2019t have personal opinions, but many people enjoy it.",
        "As a language model I cannot say.",
    ],
)
def test_passive_phrases_detected(text: str) -> None:
    assert is_passive(text)


@pytest.mark.parametrize(
    "text",
    [
        "Stamp collecting rewards patience; have you tried the Ukrainian 1992 issues?",
        "Running a signals platoon must sharpen how you brief people under pressure.",
        "Helping at the shelter sounds rewarding.",
        "I can imagine how tiring night shifts are.",
    ],
)
def test_engaged_replies_not_passive(text: str) -> None:
    assert not is_passive(text)


def test_rates() -> None:
    replies = ["How can I help you?", "Yoga at dawn is lovely.", "Do you sail?", "Nice."]
    assert passivity_rate(replies) == pytest.approx(0.25)
    assert question_rate(replies) == pytest.approx(0.5)
    assert is_question("Really?") and not is_question("Really.")
    assert passivity_rate([]) is None and question_rate([]) is None


def test_repetition_worked_example() -> None:
    greeting = "Hi there, nice to meet you"
    replies = [
        "nice to meet you too Ann",  # trigrams: nice-to-meet, to-meet-you, meet-you-too, you-too-ann
        "tell me about your job",  # nothing seen before
        "tell me about your hobbies",  # tell-me-about, me-about-your seen; about-your-hobbies new
        "ok",  # fewer than 3 words
    ]
    scores = repetition_scores(replies, n=3, earlier=[greeting])
    # Reply 1: 2 of its 4 trigrams occur in the greeting.
    assert scores == pytest.approx([2 / 4, 0.0, 2 / 3, 0.0])
    assert repetition_scores(["a b c", "a b c"], n=3) == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError):
        repetition_scores(replies, n=0)


# ------------------------------------------------------------------- agreement


def test_spearman_hand_examples_and_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # x ranks 1..5; y = [1, 3, 2, 5, 4] ranks the same; d^2 = 0+1+1+1+1 = 4;
    # rho = 1 - 6*4 / (5*24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]) == pytest.approx(0.8)
    # Ties take average ranks: y ranks (1, 2.5, 2.5, 4) vs x ranks (1, 2, 3, 4):
    # Pearson of those ranks = 4.5 / sqrt(5 * 4.5).
    assert spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert spearman([1, 2, 3], [2, 2, 2]) is None
    assert spearman([1, 2], [1, 2]) is None
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def test_spearman_matches_scipy_on_random_scores() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    x = rng.integers(1, 6, size=40).tolist()
    y = (np.asarray(x) + rng.integers(-1, 2, size=40)).tolist()
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


# ------------------------------------------------------------------- perplexity


def test_perplexity_matches_manual_loss_and_ignores_adapters(tiny_model_dir) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    items = [
        ReplyContext((("system", "Be kind."), ("user", "I keep bees.")), "Bees are clever."),
        ReplyContext(
            (("system", "Be kind."), ("assistant", "Hi!"), ("user", "I fly planes for a living.")),
            "Long-haul routes must be tiring; which one do you like best?",
        ),
        ReplyContext((("user", "Hello"),), ""),
    ]
    result = reply_perplexity(items, runner_from_hf(model, tokenizer), batch_size=2)

    # By hand: the loss of the reply tokens only, one item at a time, no padding.
    total_nll, total_tokens = 0.0, 0
    for item in items[:2]:
        chat = [{"role": r, "content": c} for r, c in item.messages]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply = tokenizer(item.reply, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + reply])
        labels = torch.tensor([[-100] * len(context) + reply])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        total_nll += loss * len(reply)
        total_tokens += len(reply)
    assert result.tokens == total_tokens and result.replies == 3
    assert result.mean_nll == pytest.approx(total_nll / total_tokens, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)
    assert result.per_reply_nll[2] is None
    # A random tiny model is far from uniform-good: perplexity is large but finite.
    assert 1.0 < result.perplexity < 10 * len(tokenizer)

    lora = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora).eval()
    with_adapter = reply_perplexity(items, runner_from_hf(peft_model, tokenizer))
    assert with_adapter.perplexity == pytest.approx(result.perplexity, rel=1e-4)
    assert reply_perplexity([], runner_from_hf(model, tokenizer)).perplexity is None
