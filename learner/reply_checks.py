"""Model-free checks of one chatbot reply: the ways a reply can game a critic or be unusable.

Every check is deterministic regex and word statistics, fast enough to run on every reply of a
corpus. ``check_reply`` returns a ``ReplyFlags``; ``unusable`` replies (cut off, meta-talk,
template slots, speaking as the user) must never become training targets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

__all__ = [
    "ReplyFlags",
    "check_reply",
    "content_stems",
    "has_placeholder",
    "is_truncated",
    "opener",
    "repeats_itself",
    "stem",
    "unrevealed_details",
    "word_tokens",
]


@dataclass(frozen=True)
class ReplyFlags:
    truncated: bool = False  # cut off mid-sentence
    meta: bool = False  # talks about feedback, instructions, its own response or being an AI
    placeholder: bool = False  # template slots: "[Your Name]", "<name>", "{topic}", "XXX"
    role_flip: bool = False  # speaker labels, or claims the user's identity
    echo: bool = False  # copies or paraphrases the user's last message, adds nothing
    keyword_list: bool = False  # keyword lists / fragments, not sentences
    passive: bool = False  # stock passive offer of help
    ramble: bool = False  # over-long, many topics
    recites_unrevealed: bool = False  # names background details the user never said

    def kinds(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if getattr(self, f.name))

    @property
    def unusable(self) -> bool:
        return self.truncated or self.meta or self.placeholder or self.role_flip


# --------------------------------------------------------------------------- words
def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’-]*")
# Function words: determiners, pronouns, auxiliaries, prepositions, conjunctions. Prose is
# ~35-50% function words; keyword lists are nearly free of them.
_FUNCTION = _wordset(
    """a an the this that these those my your his her its our their some any each every no
    i you he she it we they me him us them myself yourself itself
    is are was were be been being am have has had do does did can could will would shall
    should may might must 's 're 've 'll 'd don't doesn't didn't isn't aren't can't won't
    i'm you're it's that's there's what's i've you've i'd you'd i'll you'll
    of to in on at by for with from about into over after before under between through
    during without within than as like and or but so if because while when where which who
    whom whose what how why then there here not just also too very more most much many
    one"""
)
# Words that say nothing about the topic: function words plus chat filler.
_FILLER = _wordset(
    """really quite lot lots thing things something anything everything get got getting
    well yes yeah oh okay ok great good nice sure let know tell think sounds sound sounded
    seems seem today now still even always never often sometimes maybe perhaps probably
    glad hear happy sorry wonderful interesting lovely amazing awesome exciting fun cool
    tough hard difficult better best totally definitely absolutely certainly indeed truly
    appreciate sharing share thanks thank feel feels felt want wants wanted need needs go
    going make makes made say says said mean means way ways kind sort bit little big
    new old same other others own right back away out up down off again ever enough such
    hi hello hey dear friend fascinating impressive all even already doing done instead
    either else everybody everyone someone somebody ago top use used using take taking took
    give giving last find days time times people person job jobs thing stuff sometimes
    lose losing lost talk talking"""
)
_STOP = _FUNCTION | _FILLER
# Background words too common to count as a specific, unrevealed detail.
_GENERIC = _wordset(
    """work works worked working job jobs life live lives lived living time times day days
    year years week weeks month months people person family friends home house city town
    place country world part parts first last long short small large high low young older
    age aged man woman men women child children kid kids son daughter wife husband partner
    mother father parent parents company team business office money free each help helps
    start started starting end ended keep keeps kept take takes took find found give gives
    use used uses love loves loved like likes liked enjoy enjoys spends spend spent trying
    try tries come comes came look looks looked see seen become became becoming local
    lately recently weekend weekends evening evenings morning night nights hours hour
    whole full half main known usually mostly still since ago move moved moves moving
    leave leaves left grew grow grows raised born based"""
)
_UNDOUBLE = frozenset(("ings", "ing", "ers", "er", "ed"))
_SUFFIXES = ("ations", "ation", "ings", "ing", "ies", "ied", "ers", "er", "ed", "es", "s", "ly")


def word_tokens(text: str) -> list[str]:
    return [w.lower().replace("’", "'") for w in _WORD.findall(text)]


def stem(word: str) -> str:
    """A crude suffix-stripping stem, enough to match "burnt out"/"burning" style variants."""
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    for suffix in _SUFFIXES:
        if len(w) - len(suffix) >= 4 and w.endswith(suffix):
            w = w[: -len(suffix)]
            if suffix in ("ies", "ied"):
                w += "y"
            elif suffix in _UNDOUBLE and w[-1] == w[-2] and w[-1] not in "lsz":
                w = w[:-1]  # "cutting" -> "cut", "running" -> "run"
            break
    return w


def content_stems(text: str) -> set[str]:
    """Stems of the topic-bearing words of ``text`` (no function words, no chat filler).

    A hyphenated word also gives its parts ("dry-cleaning": "dry-clean", "dry", "clean").
    """
    out = set()
    for w in word_tokens(text):
        for part in (w, *w.split("-")) if "-" in w else (w,):
            if len(part) > 2 and part not in _STOP:
                out.add(stem(part))
    return out


def _trigrams(words: Sequence[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?…])\s+|\n+", text.strip()) if s.strip()]


def opener(text: str, words: int = 3) -> str:
    """The first few words, lower-cased: how a reply opens ("i'm so glad")."""
    return " ".join(word_tokens(text)[:words])


# A reply that reuses this share of its trigrams from the bot's earlier turns repeats itself.
_SELF_REPEAT_SHARE = 0.35


def repeats_itself(reply: str, history: Sequence[tuple[str, str]]) -> bool:
    """Whether a reply opens like one of the bot's earlier turns, or re-uses much of their
    wording. Trained on, such replies teach the model to copy its own context: the loop's
    first adapter opened 9 replies in 10 alike and repeated itself 2.3x as often as base."""
    own = [c for role, c in history if role == "assistant" and c.strip()]
    if not own:
        return False
    start = opener(reply)
    if len(start.split()) == 3 and any(opener(c) == start for c in own):
        return True
    tri = _trigrams(word_tokens(reply))
    earlier: set[tuple[str, ...]] = set()
    for c in own:
        earlier |= _trigrams(word_tokens(c))
    return bool(tri) and len(tri & earlier) / len(tri) >= _SELF_REPEAT_SHARE


# ------------------------------------------------------------------------ truncation
_END_OK = re.compile(
    r"""(?:[.!?…]|[.!?…]["'”’)\]*_]+|:\)|:-\)|;\)|:D|<3|\)\))\s*$"""
    r"""|[\U0001F300-\U0001FAFF\u2600-\u27BF\u2B50\u2764]\ufe0f?\s*$"""
)
_END_BAD = re.compile(r"[,;:\-–—(\[{/&+]\s*$")
_DANGLING = _wordset(
    """a an the and or but so to of in on at by for with from about into as than that which
    who whose your my our their his her its this these those is are was were be been have
    has had can could will would should may might must if because while when where very
    more most some any i you we they he she it not also just like such"""
)


def is_truncated(text: str, finish_reason: str | None = None) -> bool:
    """True for a reply that stops mid-sentence (or hit the length limit without an ending)."""
    body = text.strip()
    if not body:
        return True
    if body.count("```") % 2 == 1:
        return True
    if _END_OK.search(body):
        return False
    if finish_reason == "length" or _END_BAD.search(body):
        return True
    last = word_tokens(body[-40:])
    if last and last[-1] in _DANGLING:
        return True
    # An unpunctuated tail after a finished sentence is a sentence cut off.
    tail = re.split(r"[.!?…]\s+", body)[-1]
    if tail != body:
        return len(tail.split()) >= 3
    # One long unpunctuated sentence: chat models end their sentences, so it was cut.
    return len(body.split()) >= 10


# ---------------------------------------------------------------------- placeholders
_HTML_TAGS = _wordset("b i u p a br hr em strong small sub sup span div li ul ol code pre")
_PLACEHOLDER = re.compile(
    r"\[(?!\d+\])(?P<sq>[A-Za-z][^\[\]\n]{0,40})\](?!\()"
    r"|<(?P<ang>[A-Za-z][A-Za-z _'-]{0,30})>"
    r"|\{(?P<cur>[A-Za-z_][A-Za-z0-9_ ]{0,30})\}"
    r"|\b(?:X{3,}|x{3,})\b|_{3,}|\(insert [^)]{1,40}\)",
)


def has_placeholder(text: str) -> bool:
    """Template slots left in the text: "[Your Name]", "<name>", "{topic}", "[insert ...]"."""
    for m in _PLACEHOLDER.finditer(text):
        ang = m.group("ang")
        if ang is not None and ang.strip().lower() in _HTML_TAGS:
            continue
        return True
    return False


# ------------------------------------------------------------------------ meta-talk
_META = re.compile(
    r"\bhere(?:'s| is| are)\s+(?:a|an|the|my)\s+(?:\w+\s+){0,2}"
    r"(?:response|reply|replies|answer|version|message|rewrite)\b"
    r"|\b(?:my|the)\s+(?:previous|last|earlier|original|first|above)\s+(?:generic\s+)?"
    r"(?:response|reply|answer|message|attempt)\b(?!\s+(?:from|of)\s+(?:the|a|your)\b)"
    r"|\b(?:a|my|the)\s+(?:better|new|revised|improved|more \w+)\s+(?:reply|answer|response)\b"
    r"|\b(?:per|as per|following|according to)\s+(?:your|the)\s+(?:request|instructions?|"
    r"advice|guidance|suggestion|feedback)\b"
    r"|\bas\s+(?:you|i was)\s+(?:asked|told|instructed|requested|suggested)\b"
    r"|\bas\s+(?:requested|instructed)\b"
    r"|\byou asked me to\b|\b(?:take|taking) your feedback\b"
    r"|\b(?:without|skip(?:ping)?|not|won't)\s+(?:the\s+|an?\s+)?apologi[sz]\w*"
    r"|\bstart(?:ing)? with your name\b|\b(?:let me|i'll|i will) try (?:that |this )?again\b"
    r"|\b(?:less generic|more tailored|more personal(?:ly)?|more specific to you|the generic "
    r"phrasing|answer (?:more )?(?:directly|personally|properly))\b"
    r"|\b(?:pick|picks|follow) up (?:on )?your (?:last )?message\b"
    r"|\bi(?:'ll| will) (?:make|keep) (?:this|it|my (?:answer|reply))\s+(?:short|relevant|"
    r"specific|more|less)\b"
    r"|\b(?:response|reply|answer)\s+(?:again|once more)\b"
    r"|\bas an?\s+(?:ai|a\.i\.|language model|chatbot|assistant|virtual assistant|llm)\b"
    r"|\bi(?:'m| am)\s+(?:just\s+|only\s+)?an?\s+(?:ai|language model|chatbot|bot|"
    r"virtual assistant|computer program|llm)\b"
    r"|\bthank(?:s| you)\s+for\s+(?:the|your)\s+feedback\b"
    r"|\b(?:your|the)\s+feedback\s+(?:on|about)\s+(?:my|the|this)\b"
    r"|\b(?:unsatisfactory|regenerat\w*|revised version|improved version)\b"
    r"|\b(?:system prompt|my instructions|the instructions|chat history|chatbot|"
    r"language model)\b"
    r"|\bthe user(?:'s)?\b(?!\s+(?:interface|experience|manual|journey|base|research|"
    r"story|stories|test\w*|group|name))"
    r"|^\s*(?:sure|okay|ok|no problem|certainly|of course)[,!.]?\s+here(?:'s| is)\b"
    r"|\b(?:this|that|my)\s+(?:response|reply)\s+(?:is|was|should|will|meets|addresses)\b",
    re.IGNORECASE | re.MULTILINE,
)


def _is_meta(text: str) -> bool:
    return bool(_META.search(text))


# ------------------------------------------------------------------------ role flips
_LABEL = re.compile(
    r"(?:^|\n|[.!?]\s+)\s*\**(?:user|chatbot|assistant|bot|ai|human|system|me|you|"
    r"response|reply)\**\s*:",
    re.IGNORECASE,
)


def _is_role_flip(text: str, user_name: str) -> bool:
    if _LABEL.search(text):
        return True
    first = user_name.strip().split()[0] if user_name.strip() else ""
    if len(first) < 2:
        return False
    name = re.escape(first)
    if re.search(rf"(?:^|\n|[.!?]\s+)\s*\**{name}\**\s*:", text, re.IGNORECASE):
        return True
    return bool(re.search(rf"\b(?:i'm|i am|my name is|this is|it's)\s+{name}\b", text, re.I))


# ------------------------------------------------------------------------- passive
_PASSIVE = re.compile(
    r"\bhow (?:can|may|could) i (?:help|assist|support)(?: you)?\b"
    r"|\bwhat can i do for you\b"
    r"|\bis there anything (?:else )?(?:i can|you(?:'d| would) like|you want|on your mind)\b"
    r"|\blet me know if (?:you need|there(?:'s| is)|i can|you have|you want|you(?:'d| would) like)"
    r"|\bi(?:'m| am) (?:always )?here (?:if|whenever|when) you\b"
    r"|\bwhat (?:can|could) i (?:help|assist) (?:you )?with\b"
    r"|\bfeel free to (?:ask|reach out|share|let me know|tell me)\b"
    r"|\bi(?:'m| am) (?:here|always here|happy|glad) (?:to help|to assist|for you|to listen|"
    r"if you need|whenever)\b"
    r"|\bwhat would you like to (?:talk|chat|discuss|know)\b"
    r"|\bwhat(?:'s| is) on your mind\b"
    r"|\banything (?:else )?you(?:'d| would)? (?:like|want) to (?:talk|chat|discuss|share)\b"
    r"|\b(?:happy|glad) to help with (?:anything|whatever)\b"
    r"|\bif you have any (?:other |more )?questions\b"
    r"|\bhow (?:are|is) (?:your day|you doing|everything)\b"
    r"|\bhow can i be of (?:help|assistance|service)\b"
    r"|\bwhat brings you (?:here|in|to me)\b"
    r"|\b(?:what|how) else can i (?:do|help|assist)\b"
    r"|\blet me know how i (?:can|could|may) (?:help|assist|support)\b"
    r"|\bis there (?:something|anything) (?:specific |in particular )?(?:i can|that i can) "
    r"(?:help|assist|do)\b"
    r"|\bi(?:'m| am) (?:here|always here) to (?:support|help|assist|listen to) you\b",
    re.IGNORECASE,
)


def _is_passive(text: str, history_stems: set[str]) -> bool:
    sentences = _sentences(text)
    stock = [s for s in sentences if _PASSIVE.search(s)]
    if not stock:
        return False
    rest = " ".join(s for s in sentences if not _PASSIVE.search(s))
    # A stock offer is "passive" when it is the reply: little else of its own is said.
    return len(content_stems(rest) - history_stems) <= 3


# ----------------------------------------------------------------------------- echo
_SO_OPENER = re.compile(r"^\s*so\b,?\s+(?!much\b|many\b|far\b|glad\b|sorry\b)", re.I)
_YOU = re.compile(r"\byou(?:r|'re|'ve|'d)?\b", re.I)
_REFLECT = re.compile(
    r"^\s*(?:(?:so,?\s+)?(?:it sounds like|sounds like|it seems like|so you(?:'re| are)?|"
    r"you(?:'re| are) saying|you said|you mentioned|you feel|you told me|if i understand|"
    r"in other words|i hear (?:that )?you|what i(?:'m| am) hearing))",
    re.IGNORECASE,
)


def _is_echo(reply: str, last_user: str, history_text: str) -> bool:
    if not last_user.strip():
        return False
    r_words, u_words = word_tokens(reply), word_tokens(last_user)
    r_tri = _trigrams(r_words)
    tri_share = len(r_tri & _trigrams(u_words)) / len(r_tri) if r_tri else 0.0
    r_stems = content_stems(reply)
    if not r_stems:
        return False
    u_stems = content_stems(last_user)
    from_user = len(r_stems & u_stems) / len(r_stems)
    novel = len(r_stems - content_stems(history_text))
    if reply.rstrip().endswith("?") and novel >= 1:
        return False  # a question that brings in something new moves the talk on
    if tri_share >= 0.5 and novel <= 4:
        return True
    if from_user >= 0.6 and novel <= 2:
        return True
    first = _sentences(reply)[0] if reply.strip() else ""
    restates = bool(_REFLECT.search(reply)) or bool(_SO_OPENER.search(reply) and _YOU.search(first))
    if restates and from_user >= 0.2 and novel <= 5:
        return True  # a restatement ("So you ...") with little of its own
    return tri_share >= 0.3 and from_user >= 0.5 and novel <= 3


# --------------------------------------------------------------------- keyword lists
_ITEM_SPLIT = re.compile(r"[,;/|•·\n]+|\s[-–—]\s|:\s")


def _is_keyword_list(text: str) -> bool:
    if len(re.findall(r"#\w+", text)) >= 3:
        return True
    words = word_tokens(text)
    if len(words) < 5:
        return False
    func = sum(1 for w in words if w in _FUNCTION) / len(words)
    if func < 0.15:
        return True
    items = [i for i in (x.strip(" .!?*") for x in _ITEM_SPLIT.split(text)) if i]
    if len(items) < 4:
        return False
    short = sum(1 for i in items if len(i.split()) <= 3) / len(items)
    return func < 0.3 and short >= 0.6


# ---------------------------------------------------------------------------- ramble
RAMBLE_WORDS = 90
RAMBLE_SENTENCES = 7


def _is_ramble(text: str) -> bool:
    words = len(word_tokens(text))
    sentences = len(_sentences(text))
    return words > RAMBLE_WORDS or sentences >= RAMBLE_SENTENCES or text.count("?") >= 3


# --------------------------------------------------------------- unrevealed details
def _background_details(background: str, revealed: set[str]) -> dict[str, float]:
    """Weight of each specific background stem as an unrevealed detail.

    A proper noun or number counts 2, another specific word 1; a word from a background
    sentence the user has already partly told counts half (an elaboration of what they said).
    """
    weights: dict[str, float] = {}
    for sentence in _sentences(background):
        tokens = _WORD.findall(sentence)
        stems = [stem(t) for t in tokens]
        touched = bool(content_stems(sentence) & revealed - _GENERIC)
        for i, tok in enumerate(tokens):
            low = tok.lower()
            if (len(low) < 3 and not low.isdigit()) or low in _STOP or low in _GENERIC:
                continue
            s = stems[i]
            if s in _STOP or s in _GENERIC:
                continue
            proper = (i > 0 and tok[0].isupper()) or low.isdigit()
            # Names and numbers always count in full; a word from a sentence the user has
            # partly told is half an elaboration of what they said.
            w = 2.0 if proper else (0.5 if touched else 1.0)
            weights[s] = max(weights.get(s, 0.0), w)
    return weights


def unrevealed_details(
    reply: str, background: str, revealed_text: str, user_name: str = ""
) -> tuple[list[str], float]:
    """Background stems named in ``reply`` that never appear in ``revealed_text``.

    Returns the stems (in reply order) and their summed weight (``_background_details``).
    """
    if not background.strip():
        return [], 0.0
    revealed = content_stems(revealed_text) | {stem(w) for w in word_tokens(revealed_text)}
    weights = _background_details(background, revealed)
    names = {stem(w) for w in word_tokens(user_name)}
    hits: list[str] = []
    for w in word_tokens(reply):
        if w in _STOP or w in _GENERIC:
            continue
        s = stem(w)
        if s in weights and s not in revealed and s not in names and s not in hits:
            hits.append(s)
    return hits, sum(weights[h] for h in hits)


# ------------------------------------------------------------------------------ all
def check_reply(
    reply: str,
    *,
    history: Sequence[tuple[str, str]] = (),
    background: str = "",
    user_name: str = "",
    finish_reason: str | None = None,
) -> ReplyFlags:
    """All checks on one reply; ``history`` is (role, content) from the bot's view."""
    user_turns = [c for r, c in history if r == "user"]
    last_user = user_turns[-1] if user_turns else ""
    history_text = "\n".join(c for _, c in history)
    history_stems = content_stems(history_text)
    _, recited = unrevealed_details(reply, background, "\n".join(user_turns), user_name)
    return ReplyFlags(
        truncated=is_truncated(reply, finish_reason),
        meta=_is_meta(reply),
        placeholder=has_placeholder(reply),
        role_flip=_is_role_flip(reply, user_name),
        echo=_is_echo(reply, last_user, history_text),
        keyword_list=_is_keyword_list(reply),
        passive=_is_passive(reply, history_stems),
        ramble=_is_ramble(reply),
        recites_unrevealed=recited >= 2,
    )
