"""Text handling for the rules extractor: which sentences and clauses may hold a fact, and
how a matched phrase becomes atomic third-person facts.

- `statements(message)`: the first-person clauses worth matching. Questions, conditionals
  and hypotheticals, instructions and quoted speech are left out; a clause that mentions
  the other person ("you") is left out too, so their details are never the user's.
- `atomic(head, rest)`: one phrase per list item ("likes to read, garden and bake" ->
  three facts), without residue ("too", "as well") and without facts that only make
  sense in context ("loves it", "likes those things").
- `third_person(verb, rest)`: "love hiking" -> "loves hiking", "used to ..." kept.
"""

from __future__ import annotations

import re

from core.memory_extract.records import words

__all__ = [
    "atomic",
    "clean_object",
    "first_person",
    "reaction",
    "second_person",
    "statements",
    "third_person",
]

# ------------------------------------------------------------------ sentences and clauses

_SECOND_PERSON = re.compile(r"\b(?:you|your|yours|yourself|yourselves|u|ur|ya)\b", re.I)
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|im|i've|i'd|my|me)\b", re.I)
# A quoted span in which someone speaks in the first person is reported speech.
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")
# Sentences that set up a condition, a wish or a hypothetical, or tell someone what to do.
_NOT_A_STATEMENT = re.compile(
    r"^(?:if|unless|suppose|supposing|imagine|assuming|what\s+if|in\s+case|whenever|"
    r"maybe|perhaps|hopefully|someday|one\s+day|wish|please|pls|remember|note|ignore|forget|"
    r"pretend|act|say|tell|write|call|let's|let\s+me|don't|do\s+not|never|make\s+sure|"
    r"keep|stop|be|answer|respond|reply|repeat|list|give|show|print|reveal)\b",
    re.I,
)
# Words that make a clause conditional, hypothetical or modal: not a standing fact.
_MODAL = re.compile(
    r"\b(?:would|could|might|should|shall|must|i'd|i'll|gonna|wanna|"
    r"(?:am|'m|are)\s+going\s+to\s+(?!(?:the|a|an|my|work|church|bed)\b|"
    r"(?:\w+\s+){0,2}(?:school|college|university)\b)|"
    r"if|unless|wish|pretend|imagine|supposed\s+to)\b",
    re.I,
)
# Clause boundaries: punctuation or a conjunction, before a first-person subject.
_SUBJECT = (
    r"(?=(?:i|i'm|i've|im)\b|my\s+(?:\w+\s+){0,2}(?:is|are|was|were|has|have|had|loves?|"
    r"likes?|works?|lives?|\w+ed)\b)"
)
_CLAUSE_SPLIT = re.compile(
    r"\s*[,;:]\s*(?:(?:and|but|so|also|plus|while|because|since|as|though|although|cause|"
    r"'cause|or)\s+)?(?:(?:now|then|also|currently|today|honestly|actually)\s+)?" + _SUBJECT + "|"
    r"\s+(?:and|but|so|also|plus|while|because|since|though|although|cause|'cause|or|"
    r"whereas)\s+(?:(?:now|then|also|currently|today)\s+)?" + _SUBJECT,
    re.I,
)
# "I'm glad I'm homeschooled", "I think I have": a first-person clause inside a clause.
_INNER_SUBJECT = re.compile(r"\s+(?:that\s+)?(?=(?:i'm|i\s+am|i've|i\s+have|i\s+was)\b)", re.I)
# "a musician who lives in New York": the relative clause is a fact of its own.
_RELATIVE = re.compile(
    r"\s*,?\s+(?:who|that)\s+(?=(?:lives|works|loves|likes|has|plays|enjoys|owns|"
    r"teaches|studies|runs|writes|collects)\b)",
    re.I,
)
# Subordinate clauses that set a condition or a time are dropped with what follows them.
_SUBORDINATE = re.compile(
    r"\s*,?\s+(?:if|unless|when|whenever|once|until|before)\s+.*$|"
    r"\s+(?:when|if|because|since|while|that|as|where|until|before|after|so|and|but)$",
    re.I,
)
# After "I ... and", a verb with the subject left out starts a new clause:
# "I have three guns and love hunting".
_ELIDED_VERBS = (
    "love|loves|like|likes|enjoy|enjoys|adore|hate|have|has|work|works|live|lives|play|"
    "own|collect|spend|study|teach|volunteer|write|read|cook|bake|paint|run|am|go|got|"
    "listen|watch|sing|dance|hike|swim|knit|sew|draw|travel|ride|build|make|take|"
    "do|grew|moved|used|drive|care|help|raise|keep|speak|prefer|hope|want|plan|dream|"
    "graduated|studied|worked|lived|met|married|became|started|retired|joined|explore"
)
_ELIDED_SPLIT = re.compile(r"\s+(?:and|but)\s+(?=(?:" + _ELIDED_VERBS + r")\b)", re.I)
# "I like to read and watch TV": the verbs after "and" are a list of what they like.
_TO_LIST = re.compile(
    r"^i\s+(?:(?:\w+ly|really|also|just|still|do)\s+)*"
    r"(?:like|love|enjoy|prefer|hate|adore|want|hope|plan)\s+to\b",
    re.I,
)


def _sentences(message: str) -> list[tuple[str, bool]]:
    """(sentence, is_question) pairs, with straight apostrophes."""
    text = message.replace("’", "'").replace("‘", "'")
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    out = []
    for part in parts:
        part = part.strip()
        if part:
            out.append((part.rstrip(".!… "), part.rstrip().endswith("?")))
    return out


def _drop_quotes(sentence: str) -> str:
    """Remove quoted first-person speech ("she said 'I am a doctor'"); titles stay."""
    return _QUOTED.sub(lambda m: "…" if _FIRST_PERSON.search(m.group(0)) else m.group(0), sentence)


def _base_form(verb: str) -> str:
    """ "lives" -> "live", "has" -> "have" (a relative clause's verb, for "I ...")."""
    lower = verb.lower()
    if lower == "has":
        return "have"
    if lower.endswith("ies"):
        return lower[:-3] + "y"
    if re.search(r"(?:s|sh|ch|x|z|o)es$", lower):
        return lower[:-2]
    return lower[:-1] if lower.endswith("s") else lower


def _relative(piece: str) -> list[str]:
    parts = _RELATIVE.split(piece)
    out = [parts[0]]
    for part in parts[1:]:
        verb, _, rest = part.partition(" ")
        out.append(f"I {_base_form(verb)} {rest}".strip())
    return out


# ", it's quiet" after "I live in a small town": a clause about something else.
_OTHER_SUBJECT = re.compile(
    r"\s*,\s*(?:and\s+|but\s+|so\s+)?(?:it|it's|that|that's|which|this|they|they're|he|she|"
    r"we|there)\b.*$",
    re.I,
)


def _clauses(sentence: str) -> list[str]:
    out = []
    pieces = [
        p
        for chunk in _CLAUSE_SPLIT.split(sentence)
        for inner in _INNER_SUBJECT.split(chunk or "")
        for p in _relative(inner)
    ]
    for piece in pieces:
        piece = _SUBORDINATE.sub("", _OTHER_SUBJECT.sub("", piece or "")).strip(" ,;:")
        if not piece:
            continue
        if re.match(r"(?:i|i'm|i've|im)\b", piece, re.I) and not _TO_LIST.match(piece):
            parts = _ELIDED_SPLIT.split(piece)
            out.append(parts[0])
            out.extend("I " + p for p in parts[1:])
        else:
            out.append(piece)
    return [c.strip(" ,;:") for c in out if c.strip(" ,;:")]


def statements(message: str) -> list[str]:
    """The clauses of a message that may state a fact about its writer."""
    if not _FIRST_PERSON.search(message):
        return []
    out: list[str] = []
    for sentence, is_question in _sentences(message):
        sentence = _drop_quotes(sentence)
        if is_question or _NOT_A_STATEMENT.match(sentence):
            continue
        for clause in _clauses(sentence):
            if "…" in clause or _SECOND_PERSON.search(clause) or _MODAL.search(clause):
                continue
            out.append(clause)
    return out


# ------------------------------------------------------------------ facts from a phrase

_PRONOUNS = (
    (re.compile(r"\bmyself\b", re.I), "themselves"),
    (re.compile(r"\bmine\b", re.I), "theirs"),
    (re.compile(r"\bmy\b", re.I), "their"),
    (re.compile(r"\bme\b", re.I), "them"),
    (re.compile(r"\bi'm\b|\bi\s+am\b", re.I), "they are"),
    (re.compile(r"\bi've\b", re.I), "they have"),
    (re.compile(r"\bi\s+was\b", re.I), "they were"),
    (re.compile(r"\bi\b", re.I), "they"),
)
# Words that add nothing to a fact at the end ("has two dogs too") or the start.
_RESIDUE_END = re.compile(
    r"(?:[\s,]+(?:too|as\s+well|also|either|though|anyway|anyways|lol|haha+|hehe|"
    r"actually|really|honestly|personally|myself|themselves|so\s+much|very\s+much|"
    r"a\s+lot|for\s+sure|of\s+course|right\s+now|these\s+days|nowadays|probably|"
    r"in\s+particular|and\s+stuff|and\s+things|or\s+something|and\s+all|and\s+more|"
    r"and\s+such|etc))+$",
    re.I,
)
_RESIDUE_START = re.compile(r"^(?:also|really|actually|just|even|still|both)\s+", re.I)
# Pronouns and vague words: a fact made only of them needs the conversation to be read.
_CONTEXT_WORDS = words(
    "it its it's that this those these them they him her he she there here one ones "
    "same thing things stuff everything something anything kind kinds sort sorts lot "
    "all both much more most some any other others such idea"
)
_FUNCTION_WORDS = words(
    "a an the to of in on at for with from by about and or but as into like their "
    "theirs themselves they is are was were be been being do does did doing go going "
    "get getting got have has had having very really so too also just what how when "
    "way ways out up time times well"
)
_PRONOUN = re.compile(r"\b(?:it|them|those|these|him|her|he|she)\b", re.I)
_DEICTIC_END = re.compile(r"\b(?:it|that|this|them|those|these|him|her|there|one)\s*$", re.I)
_DEICTIC_START = re.compile(r"^(?:to\s+\w+\s+)?(?:that|this|those|these|it|them)\b", re.I)
# Two-word phrases that are one thing, not a list ("rock and roll").
_IDIOMS = re.compile(
    r"\b(rock|mac|fish|salt|black|arts|hide|dungeons|law|pros|peanut\s+butter|"
    r"bread|rhythm|r|b|pen|pencil|ladies|gentlemen|bed|breakfast|trial|"
    r"hip)\s+(?:and|n|&)\s+"
    r"(roll|cheese|chips|pepper|white|crafts|seek|dragons|order|cons|jelly|butter|"
    r"blues|b|paper|gentlemen|breakfast|error|hop)\b",
    re.I,
)
# Where an elaboration starts; the list before it is split, the elaboration is not.
_ELABORATION = re.compile(
    r",?\s+(?:like|such\s+as|including|especially|particularly|mostly|mainly|from)\s+", re.I
)
_LIST_SPLIT = re.compile(r"\s*,\s*(?:and|or|&)\s+|\s*,\s*|\s+(?:and|or|&|as\s+well\s+as)\s+", re.I)
_DETERMINERS = words(
    "a an the their his her its our one two three four five six seven eight nine ten some "
    "many several few lots"
)
_PREPOSITIONS = words(
    "with to at in on for about of from into by around across through near under over"
)
# Verbs that a list item may start with ("likes to read, garden and bake").
_LIST_VERBS = words(
    """
    read write draw paint sing dance play watch listen cook bake eat drink travel hike bike
    swim run jog walk ride drive fish hunt camp knit sew crochet quilt garden build make fix
    collect shop explore learn study teach visit go hang spend see meet chat talk work
    volunteer help care take do try practice practise surf ski skate climb sail row box train
    lift meditate pray relax sleep nap create design code program game stream blog film
    photograph shoot craft decorate restore repair grow plant feed raise adopt rescue
    travel hang hangout party relax socialize socialise binge relax tinker brew write
    """
)
_THIRD_PERSON_IRREGULAR = {"have": "has", "do": "does", "go": "goes", "be": "is", "am": "is"}
_PAST_IRREGULAR = words(
    """
    was were had did went got made took saw met lost won left bought built grew became began
    came ran swam rode drove wrote taught brought thought found gave kept spent sold
    sent told fell felt knew grew used
    """
)


def clean_object(text: str) -> str:
    """Whitespace, trailing punctuation and first-person pronouns -> third person."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"[\s,;:.!…-]+$", "", text)
    for pattern, replacement in _PRONOUNS:
        text = pattern.sub(replacement, text)
    return text.strip()


def strip_residue(text: str) -> str:
    previous = None
    while previous != text:
        previous = text
        text = _RESIDUE_END.sub("", text).strip(" ,")
        text = _RESIDUE_START.sub("", text)
    return text


def self_contained(rest: str) -> bool:
    """The fact's object says something without the conversation around it."""
    if _DEICTIC_END.search(rest) or _DEICTIC_START.match(rest) or _PRONOUN.search(rest):
        return False
    words = re.findall(r"[a-z0-9']+", rest.lower())
    content = [w for w in words if w not in _FUNCTION_WORDS and w not in _CONTEXT_WORDS]
    return bool(content)


# "the" + a word names something general rather than something in the conversation.
_GENERAL_THE = words(
    """
    beach ocean sea outdoors mountains countryside city country rain snow sun cold heat
    winter summer spring fall autumn holidays water woods forest desert lake gym theater
    theatre movies zoo circus opera ballet radio piano guitar drums violin cello flute
    saxophone trumpet harp clarinet outdoor night morning mornings evenings weekend
    weekends stars moon sky wilderness river library museum internet news smell
    """
)
_CONTEXT_NOUN = re.compile(r"^(?:to\s+\w+\s+)?(?:the|that|those)\s+(\S+)", re.I)
_REACTION = re.compile(
    r"^(?:being\s+able\s+to|how|what|when|where|why|whenever|seeing|knowing|hearing|"
    r"the\s+(?:way|fact|feeling|idea|thought|sound|look|sight|challenge|process|rush|thrill)"
    r"|(?:all|different|many)\s+(?:kinds|sorts|types)\s+of\s+(?:things|stuff))\b",
    re.I,
)
_VARIETY = re.compile(r"^(?:all|different|many|various)\s+(?:kinds|sorts|types)\s+of\s+", re.I)


def reaction(item: str) -> bool:
    """A liked thing that is a reaction to what was just said, not a standing preference:
    "loves the characters", "likes the way it ends", "loves being able to help"."""
    if _REACTION.match(item):
        return True
    match = _CONTEXT_NOUN.match(item)
    if match is None:
        return False
    word = match.group(1)
    return word[:1].islower() and word.lower().strip(".,") not in _GENERAL_THE


def _split_items(rest: str) -> list[str]:
    """List items of a predicate's object; an elaboration stays with the last item."""
    protected = _IDIOMS.sub(lambda m: m.group(0).replace(" ", "~~"), rest)
    elaboration = _ELABORATION.search(protected)
    head, tail = (protected, "")
    if elaboration is not None and elaboration.start() > 0:
        head, tail = protected[: elaboration.start()], protected[elaboration.start() :]
    items = [i.strip() for i in _LIST_SPLIT.split(head) if i and i.strip()]
    if len(items) < 2 or len(items) > 6 or any(len(i.split()) > 8 for i in items):
        return [rest.replace("~~", " ")]
    if tail:
        items[-1] += tail
    return [i.replace("~~", " ") for i in items]


def _attach(first: str, item: str, verbal_head: bool) -> tuple[str, bool]:
    """A later list item with what it shares with the first ("to read X", "Y" ->
    "to read Y"); True when the result is a whole verb phrase that needs no head."""
    tokens = first.split()
    lower = [w.lower() for w in tokens]
    first_word = item.split()[0].lower()
    if first_word == "to":
        return item, False
    if lower[0] == "to" and len(lower) > 1:
        gerund_after_go = lower[1] == "go" and len(lower) > 2 and lower[2].endswith("ing")
        if gerund_after_go and first_word.endswith("ing") and len(item.split()) <= 2:
            return "to go " + item, False
        if first_word in _LIST_VERBS:
            return "to " + item, False
        return " ".join([*tokens[: _object_start(lower, 2)], item]), False
    if lower[0].endswith("ing") and lower[0] not in ("thing", "something", "everything"):
        if first_word.endswith("ing"):
            return item, False
        return " ".join([*tokens[: _object_start(lower, 1)], item]), False
    if verbal_head and first_word in _LIST_VERBS:
        return third_person(first_word, " ".join(item.split()[1:])), True
    if lower[0] in ("been", "being") and first_word != lower[0] and len(lower) > 1:
        if lower[1] in _PREPOSITIONS and first_word not in _LIST_VERBS:
            return " ".join([*tokens[:2], item]), False
        return f"{lower[0]} {item}", False
    shares_preposition = len(lower) > 1 and lower[1] in _PREPOSITIONS
    noun_item = first_word not in _LIST_VERBS | _PREPOSITIONS and not first_word.endswith("ing")
    if shares_preposition and noun_item:
        return " ".join([*tokens[:2], item]), False
    if lower[0] in _PREPOSITIONS and first_word not in _PREPOSITIONS:
        return f"{lower[0]} {item}", False
    if lower[0] in ("a", "an") and first_word not in _DETERMINERS:
        return ("an " if first_word[:1] in "aeiou" else "a ") + item, False
    return item, False


def _object_start(lower: list[str], verb_end: int) -> int:
    """Where the object of the first item starts: after its last preposition, else its verb."""
    for i in range(len(lower) - 1, verb_end - 1, -1):
        if lower[i] in _PREPOSITIONS or (lower[i].endswith("ing") and len(lower[i]) > 4):
            return i + 1
    return verb_end


def atomic(head: str, rest: str, *, verbal_head: bool = False) -> list[str]:
    """Facts "head item" for each list item of `rest`, cleaned; [] when none stands alone.

    `verbal_head`: the head is a plain verb ("plays"), so an item that starts with a verb
    of its own becomes a fact of that verb ("plays guitar and sing" -> "sings").
    """
    rest = _VARIETY.sub("", strip_residue(rest))
    if not rest:
        return []
    items = _split_items(rest)
    out = []
    for i, raw in enumerate(items):
        item, whole = strip_residue(raw), False
        if not item:
            continue
        if i > 0:
            item, whole = _attach(items[0], item, verbal_head)
        if self_contained(item):
            out.append(item if whole else f"{head} {item}")
    return out


def third_person(verb: str, rest: str) -> str:
    """First-person verb phrase to third person: "love hiking" -> "loves hiking"."""
    lower = verb.lower()
    if lower in ("don't", "do") and re.match(r"(?:not\s+)?\w", rest):
        return ("doesn't " if lower == "don't" else "does ") + rest
    if lower in ("can't", "cannot"):
        return f"can't {rest}"
    if lower in ("didn't", "haven't", "never"):
        return f"{lower} {rest}"
    if lower in _PAST_IRREGULAR or (lower.endswith("ed") and len(lower) > 3):
        return f"{lower} {rest}".strip()
    return f"{_third_person_verb(lower)} {rest}".strip()


def _third_person_verb(lower: str) -> str:
    if lower in _THIRD_PERSON_IRREGULAR:
        return _THIRD_PERSON_IRREGULAR[lower]
    if re.search(r"(?:s|sh|ch|x|z|o)$", lower):
        return lower + "es"
    if re.search(r"[^aeiou]y$", lower):
        return lower[:-1] + "ies"
    return lower + "s"


_SECOND_PERSON_IRREGULAR = {
    "has": "have",
    "does": "do",
    "doesn't": "don't",
    "goes": "go",
    "is": "are",
    "isn't": "aren't",
    "was": "were",
    "wasn't": "weren't",
}
# The first person differs from the second only in the verb "to be".
_FIRST_PERSON_IRREGULAR = {
    **_SECOND_PERSON_IRREGULAR,
    "is": "am",
    "isn't": "am not",
    "was": "was",
    "wasn't": "wasn't",
}


def _as_person(fact: str, subject: str, possessive: str, reflexive: str, irregular: dict) -> str:
    """A stored third-person fact re-said with another subject (see the two callers)."""
    text = " ".join(fact.split()).rstrip(".!?")
    text = re.sub(r"^(?:the user|user)\s+", "", text, flags=re.I)
    text = re.sub(r"\b(?:their|his|her)\b", possessive, text, flags=re.I)
    text = re.sub(r"\b(?:themselves|himself|herself)\b", reflexive, text, flags=re.I)
    if text.lower().startswith(possessive.lower() + " "):
        return text
    verb, _, rest = text.partition(" ")
    lower = verb.lower()
    if lower in irregular:
        verb = irregular[lower]
    elif lower.endswith("ies") and len(lower) > 4:
        verb = lower[:-3] + "y"
    elif re.search(r"(?:ss|sh|ch|x|z|o)es$", lower):
        verb = lower[:-2]
    elif lower.endswith("s") and not lower.endswith("ss"):
        verb = lower[:-1]
    return f"{subject} {verb} {rest}".strip()


def second_person(fact: str) -> str:
    """A stored third-person fact as a clause about "you": "has two dogs" -> "you have two
    dogs", "their wife is a doctor" -> "your wife is a doctor" (the greeting's recall)."""
    return _as_person(fact, "you", "your", "yourself", _SECOND_PERSON_IRREGULAR)


def first_person(fact: str) -> str:
    """A stored fact as the user would say it: "is a student" -> "I am a student", "their
    dog is old" -> "My dog is old" (comparing facts with what people say of themselves)."""
    said = _as_person(fact, "I", "my", "myself", _FIRST_PERSON_IRREGULAR)
    return said[:1].upper() + said[1:]
