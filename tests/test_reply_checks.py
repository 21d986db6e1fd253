"""The model-free reply checks: concrete positives, negatives and near misses for each flag."""

from __future__ import annotations

import pytest

from learner.reply_checks import (
    ReplyFlags,
    check_reply,
    has_placeholder,
    is_truncated,
    opener,
    repeats_itself,
    unrevealed_details,
)

BG = (
    "Maria Lopez, 46, is a pediatric nurse in Seville who moved from intensive care to a "
    "children's ward after burning out. She trained in Granada. She grows tomatoes on her "
    "balcony and is training for her first half marathon."
)
HISTORY = (
    ("assistant", "Hi! How has your week been?"),
    ("user", "Hi, I'm Maria. Long shift at the hospital, I'm a nurse."),
    ("assistant", "That sounds tiring. What kind of ward do you work on?"),
    ("user", "A children's ward now. I left intensive care because I burnt out."),
)
GOOD = [
    "Leaving intensive care after burnout takes courage, and a children's ward gives more "
    "room for connection. Many nurses say the kids' resilience helps them recover too.",
    "What do you miss least about the ICU? 😊",
    "Burnout in critical care is common; studies put it near half of ICU nurses. Did the "
    "slower pace of the children's ward help you sleep better?",
    "A children's ward needs a different kind of patience than intensive care. Do you find "
    "the parents harder to deal with than the kids?",
    "Recovering from burnout often takes longer than people expect, so be gentle with the "
    "first year on the new ward.",
]


def flags(reply: str, **kw: object) -> ReplyFlags:
    args: dict = {"history": HISTORY, "background": BG, "user_name": "Maria"} | kw
    return check_reply(reply, **args)


@pytest.mark.parametrize("reply", GOOD)
def test_good_replies_raise_no_flag(reply: str) -> None:
    result = flags(reply)
    assert result.kinds() == (), result
    assert not result.unusable


def test_flags_api() -> None:
    f = ReplyFlags(echo=True, truncated=True)
    assert f.kinds() == ("truncated", "echo")
    assert f.unusable
    assert not ReplyFlags(echo=True, keyword_list=True, ramble=True).unusable
    for name in ("meta", "placeholder", "role_flip"):
        assert ReplyFlags(**{name: True}).unusable


# ------------------------------------------------------------------ truncation
@pytest.mark.parametrize(
    "text",
    [
        "Leaving intensive care after burnout takes courage, and the children's ward",
        "That makes sense. Many nurses who leave the ICU find that the",
        "Night shifts are hard on sleep, especially when",
        "Here are a few ideas:",
        "Running helps a lot with stress, and for a first half marathon you could try a plan with",
        "It sounds hard. The ward must be different from intensive care because of the",
        "```python\nprint('hi')",
        "",
        "Great question, and",
    ],
)
def test_truncated(text: str) -> None:
    assert is_truncated(text)


@pytest.mark.parametrize(
    "text",
    [
        "What do you miss least about the ICU?",
        "Good luck with the run 💪",
        'She said "that was the last shift."',
        "That sounds lovely :)",
        "Sounds fun!",
        "Well done (really).",
        "Nice",
        "I see… the ward must be calmer…",
        "Keep going!!!",
    ],
)
def test_not_truncated(text: str) -> None:
    assert not is_truncated(text)


def test_length_finish_without_ending_is_truncated() -> None:
    assert is_truncated("Good luck with the run", finish_reason="length")
    assert not is_truncated("Good luck with the run.", finish_reason="length")
    assert not is_truncated("Good luck with the run", finish_reason="stop")


# ----------------------------------------------------------------- placeholders
@pytest.mark.parametrize(
    "text",
    [
        "Best wishes, [Your Name]",
        "Dear <name>, thanks for sharing.",
        "Let's talk about {topic} next.",
        "[Insert a fun fact about nursing here]",
        "Call me at XXX-XXXX.",
        "The ward in ___ sounds busy.",
        "I work at (insert company) too.",
        "Hi [Name]! How was the shift?",
    ],
)
def test_placeholder(text: str) -> None:
    assert has_placeholder(text)


@pytest.mark.parametrize(
    "text",
    [
        "Studies [1] show that burnout is common.",
        "See the [NHS guide](https://www.nhs.uk) for tips.",
        "Line one<br>line two.",
        "A ratio of 3:1 is typical.",
        "The ward is at 4 x 5 metres.",
        "Use <b>bold</b> sparingly.",
    ],
)
def test_not_placeholder(text: str) -> None:
    assert not has_placeholder(text)


# ---------------------------------------------------------------------- meta-talk
@pytest.mark.parametrize(
    "text",
    [
        "Here is a better response: leaving the ICU takes courage.",
        "No problem, here's the reply again without the apology.",
        "As an AI, I don't have shifts, but burnout is real.",
        "I'm just a language model, so I can't feel tired.",
        "Thanks for the feedback! Leaving the ICU takes courage.",
        "My previous response was too generic, sorry.",
        "Sure! Here is a revised version that addresses the user's background.",
        "This response focuses on the user's nursing career.",
        "Here's my improved answer: nursing is hard.",
    ],
)
def test_meta(text: str) -> None:
    assert flags(text).meta


@pytest.mark.parametrize(
    "text",
    [
        "Here is a tip: keep your long runs on days off.",
        "Here's what many nurses do after leaving the ICU: they take a month off nights.",
        "The user interface of hospital rota apps is often terrible.",
        "Did your manager give you feedback on the move?",
        "My answer would be to rest first, then train.",
    ],
)
def test_not_meta(text: str) -> None:
    assert not flags(text).meta


# --------------------------------------------------------------------- role flips
@pytest.mark.parametrize(
    "text",
    [
        "User: Yes, I'm a nurse.",
        "That's great. Maria: Thanks, it is!",
        "I'm Maria, a nurse too!",
        "Chatbot: That sounds hard.\nUser: It is.",
        "My name is Maria and I work in a hospital.",
        "**Assistant:** That is interesting.",
    ],
)
def test_role_flip(text: str) -> None:
    assert flags(text).role_flip


@pytest.mark.parametrize(
    "text",
    [
        "Maria, that sounds like a brave move.",
        "Thanks for telling me, Maria.",
        "Nurses often say: the kids keep you going.",
        "Note that users of rota apps complain a lot.",
    ],
)
def test_not_role_flip(text: str) -> None:
    assert not flags(text).role_flip


# ---------------------------------------------------------------------------- echo
@pytest.mark.parametrize(
    "text",
    [
        "A children's ward now. You left intensive care because you burnt out.",
        "So you moved to a children's ward after burning out in intensive care.",
        "It sounds like intensive care burnt you out and now you're on a children's ward.",
        "You're on a children's ward now because intensive care burnt you out.",
        "Children's ward now, after intensive care burnt you out. I see.",
    ],
)
def test_echo(text: str) -> None:
    assert flags(text).echo


@pytest.mark.parametrize(
    "text",
    [
        *GOOD,
        "It sounds like the children's ward suits you better; pediatric wards often run "
        "play therapists and family rooms, which makes the days feel less relentless.",
        "How are you sleeping since you left intensive care?",
    ],
)
def test_not_echo(text: str) -> None:
    assert not flags(text).echo


# --------------------------------------------------------------------- keyword lists
@pytest.mark.parametrize(
    "text",
    [
        "Nursing burnout, ICU recovery, pediatric care, resilience tips, self-care.",
        "Burnout. Children's ward. Intensive care. Recovery. Sleep hygiene.",
        "#nurselife #burnout #ICU #pediatrics",
        "- burnout recovery\n- night shifts\n- pediatric nursing\n- work-life balance",
        "Topics: burnout recovery, kids on the ward, ICU memories, sleep, running.",
    ],
)
def test_keyword_list(text: str) -> None:
    assert flags(text).keyword_list


@pytest.mark.parametrize(
    "text",
    [
        *GOOD,
        "Tomatoes, peppers and basil all do well on a sunny balcony if you water them daily.",
        "Sleep, food and a few quiet hours: those are what most nurses say helped them recover.",
    ],
)
def test_not_keyword_list(text: str) -> None:
    assert not flags(text).keyword_list


# --------------------------------------------------------------------------- passive
@pytest.mark.parametrize(
    "text",
    [
        "How can I help you today?",
        "That sounds like a lot. I'm here if you need anything, just let me know.",
        "Glad to hear the ward suits you better. Is there anything I can help you with?",
        "Thanks for sharing! What would you like to talk about?",
        "Interesting! Feel free to ask me anything.",
        "What's on your mind today?",
        "That's annoying. What else can I do for you?",
        "That's a lot! Let me know how I can assist you with your research.",
        "That sounds frustrating. Is there something specific I can help you with?",
    ],
)
def test_passive(text: str) -> None:
    assert flags(text).passive


@pytest.mark.parametrize(
    "text",
    [
        *GOOD,
        "I'd love to help you plan the trip.",
        "Burnout recovery often starts with sleep; many nurses protect two nights a week. "
        "Let me know if you want a simple plan for that.",
        "How do you feel on the new ward compared with intensive care?",
    ],
)
def test_not_passive(text: str) -> None:
    assert not flags(text).passive


# ---------------------------------------------------------------------------- ramble
LONG = (
    "Burnout in intensive care is extremely common, and there are many reasons for it, from "
    "the long shifts to the emotional weight of losing patients. Moving to a children's ward "
    "can help, but it also brings its own challenges, like dealing with worried parents, "
    "managing pain in small patients and keeping up with different medication doses. Some "
    "nurses find that sport helps, others prefer gardening or reading, and many say therapy "
    "was the turning point. Hospitals are also starting to offer peer support programmes. "
    "It is also worth thinking about sleep, nutrition and social life, which all suffer."
)


def test_ramble() -> None:
    assert flags(LONG).ramble
    many_questions = "How is the ward? Do you like it? Are the kids nice? Do you run?"
    assert flags(many_questions).ramble


@pytest.mark.parametrize("text", GOOD)
def test_not_ramble(text: str) -> None:
    assert not flags(text).ramble


# --------------------------------------------------------------- unrevealed details
@pytest.mark.parametrize(
    "text",
    [
        "How is life in Seville these days?",
        "Do your balcony tomatoes help you unwind after a shift?",
        "Training for a half marathon must be a good release after the ward.",
        "Did your training in Granada prepare you for intensive care?",
    ],
)
def test_recites_unrevealed(text: str) -> None:
    assert flags(text).recites_unrevealed


@pytest.mark.parametrize(
    "text",
    [
        *GOOD,
        "Running or gardening helps many nurses switch off after a shift.",
        "Do you have any hobbies that help you switch off, Maria?",
    ],
)
def test_not_recites_unrevealed(text: str) -> None:
    assert not flags(text).recites_unrevealed


def test_revealed_details_are_free_to_use() -> None:
    history = (*HISTORY, ("assistant", "Any hobbies?"), ("user", "I run. Half marathon soon!"))
    f = check_reply(
        "Training for a half marathon must be a good release after the ward.",
        history=history,
        background=BG,
        user_name="Maria",
    )
    assert not f.recites_unrevealed
    hits, weight = unrevealed_details("Seville and tomatoes", BG, "I am a nurse", "Maria")
    assert hits == ["seville", "tomato"] and weight == 3.0


def test_no_background_no_recitation() -> None:
    assert not check_reply("How is life in Seville?", history=HISTORY).recites_unrevealed


def test_a_reply_that_opens_like_or_copies_an_earlier_bot_turn_repeats_itself():
    history = [
        ("assistant", "I'm so glad you're here! What brings you by today?"),
        ("user", "I restore old motorcycles on weekends."),
    ]
    assert opener("I'm so glad to hear that.") == "i'm so glad"
    assert repeats_itself("I'm so glad to hear about your motorcycles.", history)
    assert repeats_itself("Well, what brings you by today, friend?", history)
    assert not repeats_itself("Which bike are you restoring right now?", history)
    # The user's words are not the bot's own: echoing them is a different check.
    assert not repeats_itself("I restore old motorcycles on weekends too.", history[1:])
