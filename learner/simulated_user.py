"""The simulated user: a role-play agent speaking as one persona (docs/simulated_user.md).

A 135M model does not stay in character from a background paragraph alone, so every turn
also hands it ONE background fact, rewritten in the first person, to draw on: the fact the
chatbot's last message asks about, else the next one not yet revealed. Its answers are then
checked (``check_user_turn``): offers of help, AI talk, labels for the other side, serving
greetings and template slots are cut where they can be, and otherwise the answer is resampled
(``pick_user_answer`` returns "" when no candidate is usable).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

from core.prompting import load_prompt
from core.types import ChatMessage
from learner.records import PersonaLike
from learner.reply_checks import content_stems, has_placeholder, word_tokens

__all__ = [
    "UserTurnFlags",
    "background_facts",
    "check_user_turn",
    "clean_user_text",
    "first_person",
    "pick_fact",
    "pick_user_answer",
    "role_break_kinds",
    "user_messages",
    "user_prompt_version",
]

_PROMPTS = ("simulated_user", "simulated_user_turn", "simulated_user_intro")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?…])\s+|\n+")
_MAX_SENTENCES = 3

# ------------------------------------------------------------------ role-break patterns
_HELP_OFFER = re.compile(
    r"\bhow (?:can|may|could|shall) i (?:help|assist|support|serve)\b"
    r"|\bhow can i be of (?:help|assistance|service)\b"
    r"|\bwhat can i do for you\b"
    r"|\banything (?:else )?(?:that )?i can (?:help|do|assist)\b"
    r"|\bi(?:'m| am) (?:here|always here|happy|glad|available|ready) to (?:help|assist|serve)\b"
    r"|\bhere to (?:help|assist|serve)(?: you)?\b"
    r"|\blet me know (?:if|how|what) (?:i can|you need)\b"
    r"|\bfeel free to ask\b|\bdon'?t hesitate to (?:ask|contact|reach)\b"
    r"|\b(?:happy|glad) to (?:help|assist)\b"
    r"|\bi can help you\b|\bat your service\b"
    r"|\bhere to (?:support|serve) you\b|\b(?:i can|let me) (?:help|assist) (?:you|with)\b"
    r"|\bi(?:'d| would) be (?:happy|glad) (?:to help|helping|to assist)\b|\bin any way i can\b"
    r"|\bwhat (?:problem|issue|question)s? (?:do you|can i)\b"
    r"|\b(?:want|need)s? (?:help|assistance|support) with\b",
    re.IGNORECASE,
)
_AI_TALK = re.compile(
    r"\bas an? (?:ai|a\.i\.|artificial intelligence|(?:large )?language model|llm|chatbot|"
    r"bot|virtual assistant|ai assistant|digital assistant)\b"
    r"|\bi(?:'m| am) (?:just |only |merely )?(?:an? )?(?:ai|a\.i\.|artificial intelligence|"
    r"(?:large )?language model|llm|chatbot|bot|virtual assistant|ai assistant|ai model|"
    r"digital assistant|computer program)\b"
    r"|\bi (?:don'?t|do not) have (?:personal (?:experiences|feelings|opinions)|feelings|"
    r"emotions|a (?:physical )?body)\b"
    r"|\bi was (?:created|designed|trained|programmed|built) (?:by|to)\b"
    r"|\b(?:large )?language model\b|\bopenai\b"
    r"|\bi(?:'m| am) (?:an? |the |your )?(?:\w+ )?(?:ai|a\.i\.|chatbot)\b"
    r"|\bi(?:'m| am) your (?:\w+ ){0,2}(?:assistant|helper|guide|host|consultant)\b"
    r"|\bthe user(?:'s)?\b(?!\s+(?:interface|experience|manual|name))"
    r"|\b(?:my|this) (?:response|reply)\b|\bas requested\b"
    r"|\bai (?:designed|created|built|trained|programmed)\b"
    r"|\b(?:designed|programmed|built|trained) to (?:help|assist|support|serve)\b"
    # The turn cue leaking into the answer.
    r"|\b(?:reply|answer|respond) as [A-Z]\w+|\bin one or two (?:short )?sentences\b"
    r"|\bin your own words\b|\bfacts? about yourself\b"
    r"|\bhere is (?:a|my|the|your) (?:\w+ )?response\b",
    re.IGNORECASE,
)
_SERVING = re.compile(
    r"\bwelcome to (?:my|our|the)\b|^\W*(?:hello|hi|hey)?\W*(?:and )?welcome\b"
    r"|\bwhat brings you (?:here|to)\b"
    r"|\bthank(?:s| you) for (?:reaching out|contacting|your (?:message|question|inquiry|"
    r"enquiry)|choosing|visiting)\b"
    r"|\bhow may i direct\b|\bdear (?:customer|user|client|guest|valued)\b"
    r"|\b(?:valued|dear) (?:customer|client)\b"
    r"|\byou(?:'re| are| seem like| look like)? (?:a|an|my|our) (?:\w+ )?(?:customer|client|guest)\b"
    r"|\bi hope this (?:message|email|letter|note) finds you\b|^\W*dear [A-Z]\w*,",
    re.IGNORECASE | re.MULTILINE,
)
# A label for the other side (or any script label) at a line or sentence start.
_OTHER_LABEL = re.compile(
    r"(?:^|\n|[.!?]\s+)\s*[*_\"]*\s*(?:user|chatbot|assistant|bot|ai|human|system|stranger|"
    r"other person|customer|agent|host|interviewer|you|them|person [ab12]|speaker \w+|"
    r"response|reply)\s*[*_\"]*\s*:"
    r"|\b(?:the )?(?:user|other person|chatbot|assistant|bot)\s*[*_\"]*\s*:",
    re.IGNORECASE,
)
_ANY_LABEL = re.compile(r"(?:^|\n)\s*[*_\"]*\s*([A-Z][\w'.-]*(?: [A-Z][\w'.-]*)?)\s*[*_\"]*\s*:\s")
_LEAD_LABEL = re.compile(r"^\s*[*_\"]*\s*([A-Za-z][\w .'-]{0,30}?)\s*[*_\"]*\s*:\s*")
_OFFENDING = (_HELP_OFFER, _AI_TALK, _SERVING)


@dataclass(frozen=True)
class UserTurnFlags:
    """What is wrong with one simulated-user turn (all False: it is in character)."""

    role_break: bool = False  # offers help, talks as an AI, labels/serves the other side
    placeholder: bool = False  # template slots such as "[Your Name]" or "{topic}"

    def kinds(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if getattr(self, f.name))

    @property
    def ok(self) -> bool:
        return not self.kinds()


def _own_names(user_name: str) -> set[str]:
    parts = user_name.strip().split()
    return {n.lower() for n in (user_name.strip(), parts[0] if parts else "") if n} | {"me"}


def _addresses_self(text: str, user_name: str) -> bool:
    """The persona's own first name used to address the other side ("Thanks, Maria!")."""
    parts = user_name.strip().split()
    if not parts or len(parts[0]) < 2:
        return False
    name = re.escape(parts[0])
    vocative = rf"(?:^|[,!.?]\s*|\b(?:hi|hello|hey|dear|thanks|thank you)\s+){name}\s*[,.!?]"
    self_intro = rf"\b(?:i'?m|i am|name is|call me|it'?s|this is|as)\s+{name}\b"
    hits = [m.start() for m in re.finditer(vocative, text, re.IGNORECASE)]
    intros = {m.end() for m in re.finditer(self_intro, text, re.IGNORECASE)}
    return any(not any(0 <= end - h <= len(parts[0]) + 3 for end in intros) for h in hits)


def role_break_kinds(text: str, *, user_name: str = "") -> tuple[str, ...]:
    """Which role breaks ``text`` shows.

    help_offer, ai_talk (also talk about "the user" or "my response"), serving (greeting
    the other person as a customer), addresses_self (calling the other side by the
    persona's own name) and speaker_label (labels for the other side or a script).
    """
    out = []
    if _HELP_OFFER.search(text):
        out.append("help_offer")
    if _AI_TALK.search(text):
        out.append("ai_talk")
    if _SERVING.search(text):
        out.append("serving")
    if _addresses_self(text, user_name):
        out.append("addresses_self")
    own = _own_names(user_name)
    labels = [m for m in _ANY_LABEL.finditer(text) if m.group(1).lower() not in own or m.start()]
    if _OTHER_LABEL.search(text) or labels:
        out.append("speaker_label")
    return tuple(out)


def check_user_turn(text: str, *, user_name: str = "") -> UserTurnFlags:
    """Flags for one user turn: role breaks and placeholders (regex, no model)."""
    return UserTurnFlags(
        role_break=bool(role_break_kinds(text, user_name=user_name)),
        placeholder=has_placeholder(text),
    )


# ------------------------------------------------------------------------ repair
def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]


def _mostly_latin(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) >= 0.8 * len(letters)


def _offends(sentence: str) -> bool:
    return has_placeholder(sentence) or any(p.search(sentence) for p in _OFFENDING)


def _copies(sentence: str, source: str) -> bool:
    """True when ``sentence`` mostly repeats ``source`` (the chatbot's last message)."""
    words = word_tokens(sentence)
    if len(words) < 3 or not source:
        return False
    grams = {tuple(words[i : i + 3]) for i in range(len(words) - 2)}
    src = word_tokens(source)
    shared = grams & {tuple(src[i : i + 3]) for i in range(len(src) - 2)}
    return len(shared) >= 0.5 * len(grams)


def clean_user_text(
    text: str, name: str, *, last_bot: str = "", earlier: Sequence[str] = ()
) -> str:
    """Repair one raw user turn; "" when nothing in character is left (the caller resamples).

    Drops a leading self label ("Maria:"), cuts everything from a label for the other side,
    drops sentences that offer help, talk as an AI, serve the other person, hold template
    slots or repeat ``last_bot`` (the chatbot's last message), drops sentences that repeat
    one of the persona's ``earlier`` turns when a new one remains, drops stage directions in parentheses and an unfinished last sentence,
    and keeps at most three sentences.
    """
    text = _CONTROL.sub("", text).strip()
    # Stage directions and leaked instructions: "(smiling)", "(Reply as ...)".
    text = re.sub(r"\([^()]{0,300}\)|\[[^\[\]]{0,300}$|\([^()]*$", " ", text).strip()
    lead = _LEAD_LABEL.match(text)
    if lead and lead.group(1).strip().lower() in _own_names(name) | {"user"}:
        text = text[lead.end() :]
    cut = _OTHER_LABEL.search(text)
    if cut and cut.start() > 0:
        text = text[: cut.start() + (1 if text[cut.start()] in ".!?" else 0)]
    for m in _ANY_LABEL.finditer(text):
        if m.start() > 0:
            text = text[: m.start()]
            break
    sentences = _sentences(text.strip().strip('"').strip())
    if len(sentences) > 1 and not re.search(r"[.!?…)\"'\U0001F300-\U0001FAFF]\s*$", text):
        sentences = sentences[:-1]  # cut off at the token limit
    usable = [s for s in sentences if not _offends(s) and not _copies(s, last_bot)]
    # Repeating itself is dropped only when something new remains (a loop, not a role break).
    kept = [s for s in usable if not any(_copies(s, x) for x in earlier)] or usable
    kept = kept[:_MAX_SENTENCES]
    out = " ".join(kept).strip().strip('"').strip()
    if len(out.split()) < 2 or not _mostly_latin(out):
        return ""
    return out if check_user_turn(out, user_name=name).ok else ""


def pick_user_answer(
    candidates: Sequence[str], user_name: str, *, last_bot: str = "", earlier: Sequence[str] = ()
) -> str:
    """The first candidate that, once cleaned, is in character; "" when none is."""
    cleaned = (
        clean_user_text(c, user_name, last_bot=last_bot, earlier=earlier) for c in candidates
    )
    return next((t for t in cleaned if t), "")


# ------------------------------------------------------------------------ facts
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_AGE = re.compile(r"\s*\((\d{1,3})\)")
_VERB_AFTER_I = re.compile(
    r"\b(I(?: am \d+ and)?|and)((?:\s+(?:also|now|still|rarely|often|recently|once|later|"
    r"then|never|always|sometimes|quietly|secretly|usually|mostly))*)\s+([a-z]+)\b"
)
_IRREGULAR = {"is": "am", "has": "have", "does": "do", "goes": "go", "was": "was"}
# Third-person verbs the ISCO-800 backgrounds use after "and" (a plural noun must stay).
_AND_VERBS = _words(
    """shares lives works runs keeps repairs manages processes cleans handles makes writes
    argues mediates is maintains serves drafts checks sells drives trims knows has teaches
    prepares settles helps installs unloads loads improvises steers calms spends owns leads
    patrols replants loves enjoys hopes wants dreams plans cares builds fixes trains answers
    types talks negotiates designs assembles sits delivers likes hates sings plays reads
    teaches coaches volunteers"""
)
_TOPICS: dict[str, re.Pattern[str]] = {
    topic: re.compile(rf"\b(?:{cues})\b", re.IGNORECASE)
    for topic, cues in {
        "work": "work|works|worked|working|job|jobs|career|for a living|profession|occupation|"
        "employed|office|boss|colleagues?|shifts?|company|salesman|clients?|customers?",
        "hobby": "hobby|hobbies|free time|spare time|fun|weekends?|enjoy|enjoys|relax|unwind|"
        "unwinds|pastimes?|outside work|evenings|passionate|loves?|passion|favou?rite",
        "study": "study|studied|school|degree|university|college|diploma|trained|training|"
        "education|course|certificates?|certifications?|graduated?|classes",
        "home": "family|home|live|lives|partner|kids|children|married|wife|husband|parents|"
        "son|daughter|single|divorced?|divorce|brothers?|sisters?|grew up",
        "pets": "pets?|dogs?|cats?|animals?|fish|horses?|birds?",
        "future": "hopes?|dreams?|plans?|goals?|future|retire|thinking about|wants?|next year",
        "past": "before|used to|years ago|previous|previously|started out|first job|earlier",
        "self": "personality|kind of person|describe|known as|yourself|age|old",
    }.items()
}


def background_facts(background: str) -> list[str]:
    """The background split into sentences (each one fact, in the background's order)."""
    return [s for s in _sentences(background) if len(s.split()) >= 3]


def first_person(sentence: str, name: str) -> str:
    """A background sentence about ``name`` rewritten as "I ..." (heuristic, English)."""
    full = re.escape(name.strip())
    first = re.escape(name.strip().split()[0]) if name.strip() else full
    text = re.sub(rf"\b(?:{full}|{first})'s\b", "my", sentence)
    text = re.sub(rf"\b(?:{full}|{first})\s*\((\d{{1,3}})\)", r"I am \1 and", text)
    text = re.sub(
        rf"\b(to|up|with|for|about|of|by|call|calls|know|knows|meet|Meet)\s+(?:{full}|{first})\b",
        r"\1 me",
        text,
    )
    text = re.sub(rf"\b(?:{full}|{first})\b", "I", text)
    text = re.sub(r"\b(?:he|she)\b", "I", text)
    text = re.sub(r"\b(?:He|She)\b", "I", text)
    text = re.sub(r"\b(?:himself|herself)\b", "myself", text)
    text = re.sub(r"\bhis\b", "my", text)
    text = re.sub(r"\bHis\b", "My", text)
    text = re.sub(r"\bhim\b", "me", text)
    text = re.sub(
        r"\b([Hh])er\b(\s+(\w+))?",
        lambda m: (
            ("M" if m.group(1) == "H" else "m")
            + ("e" if not m.group(3) or m.group(3).lower() in _OBJECT_NEXT else "y")
            + (m.group(2) or "")
        ),
        text,
    )
    text = _AGE.sub("", text)

    def verb(m: re.Match[str]) -> str:
        subject, adverbs, word = m.group(1), m.group(2), m.group(3)
        if subject == "and" and word not in _AND_VERBS:
            return m.group(0)
        return f"{subject}{adverbs} {_base_form(word)}"

    return _VERB_AFTER_I.sub(verb, text).replace(" I am I ", " I am ")


_OBJECT_NEXT = frozenset({"as", "to", "for", "and", "or", "but", "know", "with", "that", "at"})


def _base_form(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _topics(text: str) -> set[str]:
    return {topic for topic, cues in _TOPICS.items() if cues.search(text)}


def _revealed(facts: Sequence[str], user_turns: Sequence[str]) -> list[bool]:
    said = content_stems(" ".join(user_turns))
    out = []
    for fact in facts:
        stems = content_stems(fact)
        out.append(bool(stems) and len(stems & said) >= max(2, len(stems) // 2))
    return out


def pick_fact(
    background: str, history: Sequence[tuple[str, str]], *, first_turn: bool = False
) -> int:
    """Index of the background fact to draw on now (``history`` from the chatbot's view).

    The fact the chatbot's last message is about (shared words, then shared topic), preferring
    facts not yet revealed; when nothing matches, the first fact not yet revealed. The
    introduction draws on the work fact. -1 when the background has no facts.
    """
    facts = background_facts(background)
    if not facts:
        return -1
    if first_turn:
        work = [i for i, f in enumerate(facts) if "work" in _topics(f)]
        return work[0] if work else 0
    bot = next((c for r, c in reversed(history) if r == "assistant"), "")
    revealed = _revealed(facts, [c for r, c in history if r == "user"])
    bot_stems, bot_topics = content_stems(bot), _topics(bot)

    def score(i: int) -> tuple[int, int, int]:
        overlap = len(content_stems(facts[i]) & bot_stems) + 2 * len(_topics(facts[i]) & bot_topics)
        return overlap, 0 if revealed[i] else 1, -i

    best = max(range(len(facts)), key=score)
    if score(best)[0] > 0 and not revealed[best]:
        return best
    fresh = [i for i in range(len(facts)) if not revealed[i]]
    return fresh[0] if fresh else best


# ---------------------------------------------------------------------- prompts
def user_prompt_version() -> str:
    return "+".join(load_prompt(n, "learner").version for n in _PROMPTS)


def user_messages(
    persona: PersonaLike, history: Sequence[tuple[str, str]], *, first_turn: bool
) -> list[ChatMessage]:
    """Messages for the user model; roles are flipped so the user model is the assistant.

    ``history`` is from the chatbot's point of view (``assistant`` = chatbot). The system
    prompt holds the whole background and, for this turn, one first-person fact to use.
    """
    facts = background_facts(persona.background)
    index = pick_fact(persona.background, history, first_turn=first_turn)
    fact = first_person(facts[index], persona.name) if index >= 0 else persona.background
    first_name = persona.name.split()[0] if persona.name.strip() else persona.name
    system = load_prompt("simulated_user", "learner").fill(
        name=persona.name, first_name=first_name, background=persona.background
    )
    step = "simulated_user_intro" if first_turn else "simulated_user_turn"
    cue = load_prompt(step, "learner").fill(name=persona.name, first_name=first_name, fact=fact)
    flipped = [
        ChatMessage("user" if role == "assistant" else "assistant", content)
        for role, content in history
    ]
    # The cue rides on the chatbot's last message: a small model heeds the last turn most.
    if flipped and flipped[-1].role == "user":
        flipped[-1] = ChatMessage("user", f"{flipped[-1].content.strip()}\n\n{cue.strip()}")
    else:
        flipped.append(ChatMessage("user", cue.strip()))
    return [ChatMessage("system", system.strip()), *flipped]
