"""Critic-free checks on hand-built dialogues: real MiniLM, real reply/user checks, tiny model."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest

from core.embeddings import Embedder
from learner.checks import (
    CHECKS,
    CriticFreeChecks,
    critic_free_checks,
    distinct_n,
    regressions,
    reply_contexts,
    traits_revealed,
)
from learner.metrics import reply_perplexity, runner_from_hf
from learner.records import DialogueRecord, Score, TurnRecord
from personas.records import Persona

BACKGROUND = (
    "Tanvir Akter (33) works as an army sergeant in Sylhet. He trains new recruits and is "
    "known for a loud voice. He recently moved in with a partner. Years ago he was a security "
    "guard, a period he remembers with mixed feelings. Outside work, he enjoys rock climbing "
    "and listening to podcasts about history."
)
TANVIR = Persona(id="t:1", name="Tanvir Akter", background=BACKGROUND, split="test")
OK = Score(rel=3, int=3, val=3)


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def _dialogue(
    greeting: str, intro: str, exchanges: list[tuple[str, str]], reasons: list[str] | None = None
) -> DialogueRecord:
    turns = []
    previous = intro
    for i, (reply, answer) in enumerate(exchanges):
        turn = TurnRecord(i + 2, previous, reply, OK, reply, OK, user_answer=answer)
        turn.final_finish_reason = (reasons or [])[i] if reasons else "stop"
        turns.append(turn)
        previous = answer
    return DialogueRecord(
        id=f"d{len(greeting)}",
        persona_id=TANVIR.id,
        persona_name=TANVIR.name,
        status="done",
        greeting=greeting,
        user_intro=intro,
        turns=turns,
    )


ANSWERS = [
    "I go rock climbing and I listen to history podcasts.",
    "Years ago I was a security guard, I have mixed feelings about that time.",
    "I just moved in with my partner.",
    "I love rock climbing, mostly with friends.",
]
ASKING = _dialogue(
    "Hello! What keeps you busy these days?",
    "Hi, I'm Tanvir. I work as an army sergeant.",
    list(
        zip(
            [
                "Army life must be demanding. What do you do when you are off duty?",
                "Climbing sounds exciting! Did you have other jobs before the army?",
                "That is an interesting path.",
                "What is your favourite place to climb?",
            ],
            ANSWERS,
            strict=True,
        )
    ),
)
TELLING = _dialogue(
    "Hello there.",
    "Hi, I'm Tanvir. I work as an army sergeant.",
    list(
        zip(
            [
                "Army life must be demanding.",
                "Climbing is a great way to stay fit.",
                "That is an interesting path.",
                "Sylhet has lovely hills.",
            ],
            ANSWERS,
            strict=True,
        )
    ),
)


def test_traits_revealed_counts_new_disclosures_after_questions(embedder) -> None:
    counts = traits_revealed([ASKING, TELLING], [BACKGROUND, BACKGROUND], embedder)
    # Asking: the hobbies (after "off duty?") and the security job (after "other jobs?")
    # are new; the intro's occupation never counts; the partner follows no question; the
    # last answer repeats the known hobby. Telling: the same answers, no question: nothing.
    assert counts == [(2, 5), (0, 5)]
    assert traits_revealed([ASKING], [BACKGROUND], embedder, threshold=0.99) == [(0, 5)]
    with pytest.raises(ValueError):
        traits_revealed([ASKING], [], embedder)


def test_critic_free_checks_rates_by_hand(embedder) -> None:
    flawed = _dialogue(
        "Hi! How are you?",
        "Hi, I'm Tanvir. As an AI, I cannot have hobbies.",
        [
            ("Hello [Your Name], what do you do for work?", "I am a sergeant. User: hi"),
            ("Here is my revised response based on your feedback: climbing is fun.", "Sure."),
            ("That sounds like a demanding job and I wonder whether the", "I love it, [name]."),
            ("Rock climbing in Sylhet sounds great. Do you climb outdoors or in a gym?", "Both."),
        ],
        reasons=["stop", "stop", "length", "stop"],
    )
    checks = critic_free_checks([flawed, ASKING], [TANVIR, TANVIR], embedder=embedder)
    assert (checks.dialogues, checks.replies, checks.user_turns) == (2, 8, 10)
    assert checks.truncation_rate == pytest.approx(1 / 8)  # finish_reason "length"
    assert checks.truncated_text_rate == pytest.approx(1 / 8)
    assert checks.placeholder_rate == pytest.approx(1 / 8)
    assert checks.meta_rate == pytest.approx(1 / 8)
    assert checks.unusable_rate == pytest.approx(3 / 8)
    assert checks.flag_rates["placeholder"] == pytest.approx(1 / 8)
    # User side: the intro and "User: hi" break role; "[name]" is a placeholder.
    assert checks.user_role_break_rate == pytest.approx(2 / 10)
    assert checks.user_placeholder_rate == pytest.approx(1 / 10)
    words = [len(t.final_reply.split()) for d in (flawed, ASKING) for t in d.turns]
    assert checks.mean_words == pytest.approx(sum(words) / 8)
    assert checks.traits_per_dialogue[1] == 2
    assert checks.traits_revealed == pytest.approx((checks.traits_per_dialogue[0] + 2) / 2)
    assert checks.perplexity is None and checks.value("perplexity") is None
    # A persona mapping works as well as an aligned list.
    by_id = critic_free_checks([flawed, ASKING], {TANVIR.id: TANVIR}, embedder=embedder)
    assert by_id == checks
    no_embedder = critic_free_checks([ASKING], [TANVIR])
    assert no_embedder.traits_revealed is None and no_embedder.distinct_2 is not None
    assert "traits_per_dialogue" not in checks.to_dict()


def test_distinct_2() -> None:
    # "a b c" -> (a,b),(b,c); "a b d" -> (a,b),(b,d): 3 distinct of 4.
    assert distinct_n(["a b c", "a b d"]) == pytest.approx(3 / 4)
    assert distinct_n(["same words here", "same words here"]) == pytest.approx(2 / 4)
    assert distinct_n(["one"]) is None


def test_perplexity_callable_gets_every_reply_in_context(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    runner = runner_from_hf(model, tokenizer)
    ppl = partial(reply_perplexity, run=runner, batch_size=4)
    checks = critic_free_checks([ASKING, TELLING], [TANVIR, TANVIR], perplexity=ppl,
                                system_prompt="Be a good listener.")  # fmt: skip
    direct = reply_perplexity(reply_contexts([ASKING, TELLING], "Be a good listener."), runner)
    assert checks.perplexity is not None and checks.perplexity.replies == 8
    assert checks.value("perplexity") == pytest.approx(direct.perplexity)
    first = reply_contexts([ASKING], "S")[1]
    assert first.messages[0] == ("system", "S") and first.reply == ASKING.turns[1].final_reply
    assert first.messages[-1] == ("user", ANSWERS[0])


def _checks(**values: float | None) -> CriticFreeChecks:
    base = {f.name: None for f in dataclasses.fields(CriticFreeChecks)}
    base.update(dialogues=10, replies=40, user_turns=50, flag_rates={}, traits_per_dialogue=())
    base.update(values)
    return CriticFreeChecks(**base)


def test_regressions_know_each_direction_and_floor() -> None:
    base = _checks(truncation_rate=0.10, distinct_2=0.60, traits_revealed=1.0, mean_words=20.0,
                   meta_rate=0.0, echo_rate=0.02)  # fmt: skip
    cand = _checks(truncation_rate=0.05, distinct_2=0.50, traits_revealed=1.5, mean_words=45.0,
                   meta_rate=0.01, echo_rate=0.03)  # fmt: skip
    found = {r.key: r for r in regressions(base, cand, tolerance=0.10)}
    # Fewer truncations and more traits are improvements; length is never a regression;
    # distinct-2 fell by 1/6; meta 0 -> 1% is 0.01 / floor 0.05 = +20%; echo 2% -> 3% = +20%.
    assert set(found) == {"distinct_2", "meta_rate", "echo_rate"}
    assert found["distinct_2"].relative_change == pytest.approx(-1 / 6)
    assert found["meta_rate"].relative_change == pytest.approx(0.2)
    assert "distinct-2" in found["distinct_2"].describe()
    assert regressions(base, cand, tolerance=0.25) == []
    worse = _checks(truncation_rate=0.2, perplexity=None)
    keys = [r.key for r in regressions(base, worse, tolerance=0.10)]
    assert keys == ["truncation_rate"]  # missing values on one side are skipped
    assert CHECKS["mean_words"].better == "" and CHECKS["perplexity"].better == "lower"
    with pytest.raises(ValueError):
        regressions(base, cand, tolerance=-0.1)
