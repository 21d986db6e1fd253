"""The simulated user stays in character: checks, repair, fact choice, and the real model.

The model tests use the embedded SmolLM2-135M (greedy) as the simulated user and MiniLM to
compare its answers with persona facts from Synthetic-Persona-Chat (tests/data/README.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from core.embeddings import Embedder
from core.local_model import LocalModel
from core.types import GenerationParams
from learner.simulated_user import (
    UserTurnFlags,
    background_facts,
    check_user_turn,
    clean_user_text,
    first_person,
    pick_fact,
    pick_user_answer,
    role_break_kinds,
    user_messages,
    user_prompt_version,
)

DATA = Path(__file__).parent / "data" / "spc_personas.json"

TANVIR = (
    "Known as down-to-earth and funny but also anxious about small things, Tanvir Akter (33) "
    "works as an army sergeant in Sylhet. He trains new recruits and is known for a loud "
    "voice. At home, Tanvir recently moved in with a partner. Years ago he was a security "
    "guard, a period he remembers with mixed feelings. In his youth he finished secondary "
    "school and NCO training. Outside work, he enjoys rock climbing and listening to podcasts "
    "about history."
)


@dataclass(frozen=True)
class _Persona:
    id: str
    name: str
    background: str


# ---------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("That's lovely. How can I help you tonight?", "help_offer"),
        ("What can I do for you?", "help_offer"),
        ("I'm here to help with anything you need.", "help_offer"),
        ("Is there anything else I can help you with?", "help_offer"),
        ("As an AI, I don't really have hobbies.", "ai_talk"),
        ("I'm a chatbot designed to enhance conversations!", "ai_talk"),
        ("Welcome to our store! What brings you here today?", "serving"),
        ("Thank you for reaching out, dear customer.", "serving"),
        ("I like hiking.\nAssistant: That sounds great!", "speaker_label"),
        ("Chatbot: Hello! I am fine.", "speaker_label"),
        ("I like it.\nAlex: and what about you?", "speaker_label"),
        ("Same goes for the other person: is there more?", "speaker_label"),
        ("I'm your AI security consultant here.", "ai_talk"),
        ("It's alright, Tanvir. I'm glad you came.", "addresses_self"),
        ("Hi Tanvir! Nice to meet you.", "addresses_self"),
        ("I am an excellent human resources AI designed to support you.", "ai_talk"),
        ("That's lovely. (Reply as Tanvir in one or two sentences)", "ai_talk"),
        ("You seem like a pleasant customer here today.", "serving"),
        ("Dear John, I hope this message finds you well.", "serving"),
    ],
)
def test_role_breaks_are_flagged(text: str, kind: str) -> None:
    flags = check_user_turn(text, user_name="Tanvir Akter")
    assert flags.role_break
    assert kind in role_break_kinds(text, user_name="Tanvir Akter")
    assert "role_break" in flags.kinds()


@pytest.mark.parametrize(
    "text",
    [
        "I work as an army sergeant in Sylhet, and the recruits keep me busy.",
        "I'm an assistant manager at a supermarket, so my days are long.",
        "My job is to help patients get back on their feet after surgery.",
        "Oh nice! Outside work I climb, and I listen to history podcasts.",
        "Honestly, I'm a bit anxious about small things. What about you?",
        "I train new recruits: it's loud work, but I like it.",
        "Hi, I'm Tanvir. I work as an army sergeant.",
    ],
)
def test_in_character_turns_pass(text: str) -> None:
    flags = check_user_turn(text, user_name="Tanvir Akter")
    assert flags == UserTurnFlags()
    assert flags.ok and flags.kinds() == ()


def test_placeholders_are_flagged() -> None:
    flags = check_user_turn("Thanks, [Your Name] here, nice to meet you!", user_name="Tanvir")
    assert flags.placeholder and flags.kinds() == ("placeholder",)
    assert check_user_turn("Dear {name}, I love it.").placeholder
    assert not check_user_turn("I was 33 [in 2020] when I moved.").role_break


# ---------------------------------------------------------------------- repair
def test_clean_cuts_a_trailing_help_offer_and_labels() -> None:
    raw = "Tanvir: I train new recruits all day. Is there anything else I can help you with?"
    assert clean_user_text(raw, "Tanvir Akter") == "I train new recruits all day."
    raw = "I love rock climbing.\nUser: Wow, me too!\nTanvir: Great."
    assert clean_user_text(raw, "Tanvir Akter") == "I love rock climbing."
    raw = "I moved in with my partner. [Your Name]\nSigned, me"
    assert clean_user_text(raw, "Tanvir Akter") == "I moved in with my partner."


def test_clean_keeps_three_whole_sentences() -> None:
    raw = "I climb. I listen to podcasts. I train recruits. I was a guard. And then I went to"
    assert clean_user_text(raw, "Tanvir Akter") == (
        "I climb. I listen to podcasts. I train recruits."
    )


@pytest.mark.parametrize(
    "raw",
    [
        "How can I help you tonight?",
        "Assistant: Hello, how may I assist?",
        "[Your Name]",
        "זהוב לנייכָל אתרך עד האמּשְׁיִמֹתינֶי",
        "",
    ],
)
def test_unrepairable_turns_clean_to_empty(raw: str) -> None:
    assert clean_user_text(raw, "Tanvir Akter") == ""


def test_clean_drops_sentences_that_repeat_the_chatbot() -> None:
    bot = "Sustainability is reshaping how we live. Imagine cities without waste!"
    raw = "Sustainability is reshaping how we live. I train recruits in Sylhet."
    assert clean_user_text(raw, "Tanvir Akter", last_bot=bot) == "I train recruits in Sylhet."
    assert clean_user_text("Imagine cities without waste!", "Tanvir Akter", last_bot=bot) == ""
    assert clean_user_text(raw, "Tanvir Akter") == raw
    # A sentence repeating its own earlier turn goes when something new remains.
    earlier = ["I train recruits in Sylhet. It is loud work."]
    both = "I train recruits in Sylhet. I also climb rocks."
    assert clean_user_text(both, "Tanvir Akter", earlier=earlier) == "I also climb rocks."
    assert clean_user_text(raw, "Tanvir Akter", last_bot=bot, earlier=earlier) == (
        "I train recruits in Sylhet."
    )


def test_clean_drops_stage_directions_and_leaked_cues() -> None:
    raw = "(Sitting down, smiling) I climb rocks on weekends. (Reply as Tanvir in one"
    assert clean_user_text(raw, "Tanvir Akter") == "I climb rocks on weekends."


def test_pick_user_answer_takes_the_first_clean_candidate() -> None:
    candidates = ["How can I help you?", "I'm an AI model.", "I climb rocks on weekends."]
    assert pick_user_answer(candidates, "Tanvir Akter") == "I climb rocks on weekends."
    assert pick_user_answer(candidates[:2], "Tanvir Akter") == ""
    assert pick_user_answer([], "Tanvir Akter") == ""


# ----------------------------------------------------------------------- facts
def test_first_person_rewrites_the_background() -> None:
    facts = background_facts(TANVIR)
    assert len(facts) == 6
    mine = [first_person(f, "Tanvir Akter") for f in facts]
    assert "I am 33 and work as an army sergeant in Sylhet." in mine[0]
    assert mine[1] == "I train new recruits and am known for a loud voice."
    assert mine[2] == "At home, I recently moved in with a partner."
    assert mine[3] == "Years ago I was a security guard, a period I remember with mixed feelings."
    assert mine[5] == "Outside work, I enjoy rock climbing and listening to podcasts about history."
    assert (
        first_person("She is single and lives alone; friends know her as loyal.", "Ines")
        == "I am single and live alone; friends know me as loyal."
    )
    assert first_person("Her free time goes to pottery.", "Ana") == "My free time goes to pottery."


def test_pick_fact_follows_the_question_then_the_unrevealed() -> None:
    greet = ("assistant", "Hello! How is your day going?")
    assert pick_fact(TANVIR, [greet], first_turn=True) == 0  # the work fact
    hobby = [greet, ("user", "Hi, I'm Tanvir."), ("assistant", "What do you do for fun?")]
    assert pick_fact(TANVIR, hobby) == 5
    school = [greet, ("user", "Hi."), ("assistant", "Where did you go to school?")]
    assert pick_fact(TANVIR, school) == 4
    # Nothing in common with the bot's message: the first fact not yet revealed.
    said = [
        greet,
        ("user", "I am 33 and work as an army sergeant in Sylhet, known as funny."),
        ("assistant", "Sustainability is reshaping cities everywhere."),
    ]
    assert pick_fact(TANVIR, said) == 1
    assert pick_fact("", [greet]) == -1


def test_user_messages_ground_each_turn_in_one_fact() -> None:
    persona = _Persona("p1", "Tanvir Akter", TANVIR)
    history = [
        ("assistant", "Hello there!"),
        ("user", "Hi, I'm Tanvir, an army sergeant."),
        ("assistant", "What do you do for fun?"),
    ]
    messages = user_messages(persona, history, first_turn=False)
    assert messages[0].role == "system"
    assert TANVIR in messages[0].content  # the whole background stays in the prompt
    assert [m.role for m in messages[1:]] == ["user", "assistant", "user"]
    last = messages[-1].content
    # The chatbot's words, then this turn's cue: one fact, in the first person.
    assert last.startswith("What do you do for fun?")
    assert "I enjoy rock climbing and listening to podcasts about history." in last
    assert "army sergeant" not in last
    intro = user_messages(persona, history[:1], first_turn=True)
    assert [m.role for m in intro] == ["system", "user"]
    assert "I am 33 and work as an army sergeant" in intro[-1].content
    assert "Hi, I'm Tanvir." in intro[-1].content
    assert len(user_prompt_version().split("+")) == 3


# ------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    lm = LocalModel(embedded_model_dir, device="cpu", model_id="embedded", batch_window_ms=0)
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


# (vendored persona, a name of ours, our question, indices of the facts it asks about)
SPC_CASES = [
    (0, "Sam", "Do you have any pets at home?", (0, 2)),
    (1, "Dave", "So what do you do for a living?", (0, 2)),
    (2, "Mike", "What is your favourite ice cream flavour?", (3,)),
    (3, "Chris", "Where did you go to university?", (2, 3)),
    (4, "Anne", "What do you like to do in your free time?", (4,)),
]


def test_answers_to_direct_questions_match_the_spc_persona(embedded, embedder) -> None:
    personas = json.loads(DATA.read_text(encoding="utf-8"))
    convs, cases = [], []
    for index, name, question, relevant in SPC_CASES:
        persona = _Persona(f"spc{index}", name, " ".join(personas[index]["facts"]))
        history = [
            ("assistant", "Hi there, nice to meet you!"),
            ("user", f"Hello, I'm {name}."),
            ("assistant", question),
        ]
        convs.append(user_messages(persona, history, first_turn=False))
        cases.append((index, relevant))
    params = GenerationParams(max_new_tokens=56, temperature=0.0)
    outputs = embedded.generate_batch(convs, params)
    for (index, relevant), (_, name, question, _), out in zip(
        cases, SPC_CASES, outputs, strict=True
    ):
        answer = clean_user_text(out.text, name)
        assert answer, f"{question!r}: no usable answer in {out.text!r}"
        assert check_user_turn(answer, user_name=name).ok, answer
        own = personas[index]["facts"]
        others = [f for j, p in enumerate(personas) if j != index for f in p["facts"]]
        # Per sentence, as bench/user_sim_faithfulness.py measures: its best match.
        vecs = embedder.encode([s for s in re.split(r"(?<=[.!?])\s+", answer) if s.strip()])
        target = float(np.max(embedder.encode([own[i] for i in relevant]) @ vecs.T))
        unrelated = float(np.max(embedder.encode(others) @ vecs.T))
        assert target > unrelated, (question, answer, target, unrelated)
        assert target >= 0.45, (question, answer, target)
