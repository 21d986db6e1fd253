"""The rules extractor's patterns: first-person self-disclosure forms, each with the
category and slot it fills, and the prototype phrases that classify open-ended ones."""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.memory_extract.records import words

__all__ = [
    "ACTIVITY_VERBS",
    "HOBBY_VERBS",
    "NOT_DISCLOSURE",
    "OPEN_MIN_SIMILARITY",
    "PROTOTYPES",
    "RULES",
    "TRANSIENT",
    "Rule",
]

_ADV = (
    r"(?:(?:also|really|actually|currently|now|still|just|recently|mostly|usually|especially|"
    r"absolutely|definitely|totally|truly|honestly|personally|always|often|sometimes|mainly|"
    r"even|only|kind\s+of|sort\s+of|pretty\s+much|basically|generally|certainly|genuinely|"
    r"do(?=\s+(?:love|like|enjoy|have|hate|adore|prefer)\b))\s+)*"
)
_I_AM = r"i(?:'m|\s+am|m)\s+" + _ADV
_I_HAVE = r"i(?:'ve|\s+have)\s+(?:got\s+)?" + _ADV
_NUM = r"(?:a|an|one|two|three|four|five|six|seven|eight|nine|ten|\d{1,2})"
_FAMILY_NOUN = (
    r"(?:kids?|children|child|sons?|daughters?|brothers?|sisters?|siblings?|wife|husband|"
    r"partner|boyfriend|girlfriend|fianc[eé]e?|twins|grand(?:children|kids|sons?|daughters?)|"
    r"dogs?|cats?|pets?|toddlers?|babies|baby|stepsons?|stepdaughters?|puppy|puppies|"
    r"kittens?|horses?|birds?|fish|hamsters?|rabbits?|turtles?|parrots?|snakes?)"
)
_FAMILY_WORD = (
    r"(?:wife|husband|partner|son|daughter|kids?|children|mom|mum|mother|dad|father|brother|"
    r"sister|parents|family|dog|cat|grandmother|grandfather|grandma|grandpa|boyfriend|"
    r"girlfriend|sons|daughters|brothers|sisters|dogs|cats|pets?|grandparents|grandkids|"
    r"grandchildren|fianc[eé]e?|twins?)"
)
HOBBY_VERBS = words(
    """
    play plays paint draw knit crochet cook bake garden hike run jog swim climb cycle bike
    sing dance write read collect restore build fish surf ski snowboard sew brew volunteer
    practice practise skate sail row box train lift meditate photograph film blog tinker
    woodwork camp hunt golf quilt ride travel
    """
)
# Verbs whose object is an activity: "likes to hike", "loves hiking" are hobbies.
ACTIVITY_VERBS = words("love loves like likes enjoy enjoys adore adores")
NOT_DISCLOSURE = words(
    """
    think thought guess know knew mean meant want wanted need needed hope feel felt see saw
    agree disagree wonder believe suppose bet understand remember forgot said say asked ask
    told tell was did do don't can can't could would should will might must just wish doubt
    heard hear apologize apologise appreciate promise swear am get got try tried bet mean
    love like hate enjoy were recommend suggest totally haven't hadn't didn't isn't wasn't
    couldn't wouldn't shouldn't imagine hear'd
    """
)
TRANSIENT = re.compile(
    r"^(?:a\s+)?(?:bit|little|lot|tad|bot|ai|sure|not|fine|good|great|ok|okay|well|sorry|glad|"
    r"happy|here|back|tired|hungry|bored|confused|curious|wondering|asking|kidding|joking|"
    r"done|ready|listening|afraid (?:i|that)|going to|gonna|about to|trying to understand|"
    r"doing|so|impressed|jealous|surprised|"
    r"thankful|grateful|honored|flattered|pleased|delighted|sorry|really|very|always up|"
    r"all ears|with you|on it|off|up for|down for|game|new here)\b"
)


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    category: str | None  # None: classify with the embedder
    key: str | None  # None: the category (or `occupation` when classified so)
    template: str  # "head {0}", or "{verb}" (the first word of the group is the verb)
    # An open "I <verb> ..." form: verbs of thinking, saying and wanting are no fact.
    strict: bool = False


def _r(
    pattern: str, category: str | None, key: str | None, template: str, *, strict: bool = False
) -> Rule:
    return Rule(re.compile(pattern, re.IGNORECASE), category, key, template, strict)


RULES: tuple[Rule, ...] = (
    _r(_I_AM + r"(\d{1,3})\s*(?:years?\s+old|yo|y/o)\b", "other", "age", "is {0} years old"),
    _r(r"i\s+" + _ADV + r"work(?:s)?\s+as\s+(.+)", "occupation", "occupation", "works as {0}"),
    _r(r"my\s+(?:job|profession|occupation)\s+is\s+(.+)", "occupation", "occupation", "is {0}"),
    _r(r"i\s+" + _ADV + r"work\s+(?:at|for)\s+(.+)", "occupation", "employer", "works at {0}"),
    _r(r"i\s+" + _ADV + r"work\s+in\s+(.+)", "occupation", "workplace", "works in {0}"),
    _r(r"i\s+" + _ADV + r"(?:have\s+)?studied\s+(.+)", "education", "education", "studied {0}"),
    _r(_I_AM + r"studying\s+(.+)", "education", "studies", "is studying {0}"),
    _r(
        _I_HAVE + r"((?:a|an)\s+(?:degree|phd|doctorate|master'?s|bachelor'?s|diploma|mba)\b.*)",
        "education",
        "education",
        "has {0}",
    ),
    _r(r"i\s+" + _ADV + r"graduated\s+(.+)", "education", "education", "graduated {0}"),
    _r(
        _I_AM + r"((?:a|an)\s+(?:\w+\s+)?(?:student|undergrad|undergraduate|grad student|"
        r"phd student|pupil)\b.*)",
        "education",
        "studies",
        "is {0}",
    ),
    _r(
        r"i\s+" + _ADV + r"(?:go|went)\s+to\s+((?:college|university|school|uni)\b.*)",
        "education",
        "studies",
        "goes to {0}",
    ),
    _r(r"i\s+" + _ADV + r"live\s+((?:in|on|near|by|at)\s+.+)", "location", "location", "lives {0}"),
    _r(_I_AM + r"based\s+(in\s+.+)", "location", "location", "is based {0}"),
    _r(r"i(?:'ve|\s+have)?\s+" + _ADV + r"moved\s+(to\s+.+)", "location", "location", "moved {0}"),
    _r(
        r"i\s+" + _ADV + r"grew\s+up\s+((?:in|on|near)\s+.+)", "location", "hometown", "grew up {0}"
    ),
    _r(_I_AM + r"((?:originally\s+)?from\s+.+)", "location", "hometown", "is {0}"),
    _r(
        r"i\s+was\s+" + _ADV + r"born\s+((?:and\s+raised\s+)?in\s+.+)",
        "location",
        "hometown",
        "was born {0}",
    ),
    _r(
        _I_AM + r"((?:happily\s+)?(?:married|divorced|single|engaged|widowed|separated)\b.*)",
        "family",
        "relationship",
        "is {0}",
    ),
    _r(
        _I_HAVE + r"(" + _NUM + r"\s+(?:\w+\s+)?(?:\w+\s+)?" + _FAMILY_NOUN + r"\b.*)",
        "family",
        "family",
        "has {0}",
    ),
    _r(
        _I_AM + r"((?:a|an)\s+(?:\w+\s+)?(?:mom|mum|mother|dad|father|parent|grandparent|"
        r"grandmother|grandfather|stepmom|stepdad|wife|husband)\b.*)",
        "family",
        "family",
        "is {0}",
    ),
    _r(r"(my\s+" + _FAMILY_WORD + r"(?:'s\s+\w+)?\s+[a-z']+\s.+)", "family", "family", "{0}"),
    _r(
        r"my\s+(?:favou?rite\s+)?(?:hobby|hobbies|pastime|pastimes|passion)\s+(?:is|are|include)"
        r"\s+(.+)",
        "hobby",
        "hobby",
        "enjoys {0}",
    ),
    _r(
        r"my\s+favou?rite\s+(\w+(?:\s+\w+){0,3}?)\s+(?:is|are)\s+(.+)",
        "preference",
        None,
        "favourite",
    ),
    _r(
        r"my\s+name\s+is\s+([A-Za-z][\w-]*(?:\s+[A-Z][\w-]*)?)",
        "other",
        "name",
        "their name is {0}",
    ),
    _r(
        _I_AM + r"(?:really\s+|very\s+|quite\s+|so\s+|a\s+bit\s+|a\s+little\s+)?"
        r"((?:worried|anxious|nervous|stressed|concerned|scared|afraid|excited)\s+"
        r"(?:about|of|for|that)\s+.+)",
        "concern",
        "concern",
        "is {0}",
    ),
    _r(
        _I_AM + r"((?:preparing\s+for|dealing\s+with|struggling\s+with|going\s+through|"
        r"looking\s+for|saving\s+(?:up\s+)?for|recovering\s+from|training\s+for|planning\s+to|"
        r"trying\s+to|hoping\s+to|working\s+towards?|applying\s+(?:for|to))\s+.+)",
        "concern",
        "concern",
        "is {0}",
    ),
    _r(
        r"(?:i\s+" + _ADV + r"(?:want|hope|plan|intend|dream|aspire)\s+(?:to|of)|my\s+(?:goal|dream"
        r"|plan)\s+is\s+to)\s+((?:be\s+(?=a\b|an\b|the\b|\w+er\b|\w+ist\b)|become|have|own|open|start|retire|move|travel|visit|learn|"
        r"buy|write|publish|get\s+married|go\s+back|run|finish|graduate|adopt|work|teach|"
        r"becoming|being|owning|opening)\b.+)",
        "concern",
        "concern",
        "wants to {0}",
    ),
    _r(
        _I_AM + r"((?:vegetarian|vegan|pescatarian|gluten[- ]free|lactose[- ]intolerant|"
        r"a\s+vegetarian|a\s+vegan)\b.*)",
        "preference",
        "diet",
        "is {0}",
    ),
    _r(
        _I_AM + r"((?:allergic|afraid|scared|terrified)\s+(?:to|of)\s+.+)",
        "preference",
        "preference",
        "is {0}",
    ),
    _r(
        _I_AM + r"((?:really\s+)?(?:into|passionate\s+about|obsessed\s+with|addicted\s+to|"
        r"a\s+(?:big\s+|huge\s+)?fan\s+of)\s+.+)",
        None,
        None,
        "is {0}",
    ),
    _r(
        r"i\s+" + _ADV + r"((?:love|like|enjoy|adore|prefer|hate|dislike|can't\s+stand|"
        r"don't\s+like|do\s+not\s+like|don't\s+enjoy)\s+.+)",
        "preference",
        "preference",
        "{verb}",
    ),
    _r(_I_AM + r"(retired\b.*)", "occupation", "occupation", "is {0}"),
    _r(
        _I_AM + r"(in\s+(?:the\s+)?(?:army|navy|air\s+force|marines|military|college|school|"
        r"high\s+school|university|grad\s+school|law\s+school|med(?:ical)?\s+school|nursing\s+school|"
        r"a\s+band|a\s+relationship|love)\b.*)",
        None,
        None,
        "is {0}",
    ),
    _r(
        _I_AM + r"(going\s+to\s+(?:\w+\s+){0,2}(?:school|college|university)\b.*)",
        "education",
        "studies",
        "is {0}",
    ),
    _r(
        r"(?:" + _I_AM + r"|" + _I_HAVE + r"been\s+)((?:interested|fascinated|passionate)\s+"
        r"(?:in|by|about)\s+.+)",
        None,
        None,
        "is {0}",
    ),
    _r(
        _I_AM
        + r"(?:so\s+|really\s+|very\s+)?((?:thinking\s+(?:about|of)\s+\w+ing|excited\s+to\s+(?:start|finally|begin|get|"
        r"move|go\s+back)|looking\s+forward\s+to\s+(?:starting|getting|moving|retiring|"
        r"finishing|graduating))\b.+)",
        "concern",
        "concern",
        "is {0}",
    ),
    _r(_I_HAVE + r"(been\s+to\s+.+)", None, None, "has {0}"),
    _r(_I_HAVE + r"(been\s+(?:married|divorced|widowed)\b.*)", "family", "family", "has {0}"),
    _r(
        r"i\s+was\s+" + _ADV + r"((?:raised|adopted|homeschooled)\b.+)",
        "family",
        "family",
        "was {0}",
    ),
    _r(
        r"i\s+" + _ADV + r"(do\s+(?:a\s+lot\s+of\s+|some\s+)?(?:\w+ing|yoga|pilates|crossfit|"
        r"karate|judo|taekwondo|jujitsu|martial\s+arts|web\s+\w+|graphic\s+design|\w+\s+work)\b.*)",
        "hobby",
        "hobby",
        "{verb}",
    ),
    _r(_I_AM + r"((?:more\s+of\s+|kind\s+of\s+|sort\s+of\s+)(?:a|an)\s+.+)", None, None, "is {0}"),
    _r(
        _I_AM + r"(not\s+(?:really\s+|much\s+|very\s+)?(?:into|a\s+fan\s+of|a\s+big\s+fan\s+of)"
        r"\s+.+)",
        "preference",
        "preference",
        "is {0}",
    ),
    _r(_I_AM + r"((?:a|an)\s+.+)", None, None, "is {0}"),
    _r(_I_AM + r"(the\s+.+)", None, None, "is {0}"),
    _r(
        _I_AM + r"((?:unable|able|not\s+able|allowed|not\s+allowed)\s+to\s+.+)",
        None,
        None,
        "is {0}",
    ),
    _r(_I_AM + r"([a-z]+ing\s+.+)", None, None, "is {0}"),
    _r(_I_AM + r"([a-z-]+)", None, None, "is {0}"),
    _r(_I_HAVE + r"(been\s+\w+ing\b.+)", None, None, "has {0}"),
    _r(_I_AM + r"(learning\s+.+)", None, None, "is {0}"),
    _r(_I_AM + r"(working\s+on\s+.+)", None, None, "is {0}"),
    _r(r"i\s+" + _ADV + r"([a-z]+\s+.+\s+for\s+a\s+living)", "occupation", "occupation", "{verb}"),
    _r(
        r"i\s+" + _ADV + r"((?:don't|do\s+not|never)\s+(?:have|eat|drink|smoke|own|watch|play|"
        r"drive|like|enjoy|read|go|celebrate|believe)\b.+)",
        None,
        None,
        "{verb}",
    ),
    _r(r"i\s+" + _ADV + r"([a-z']+\s+.+)", None, None, "{verb}", strict=True),
    _r(r"i\s+" + _ADV + r"([a-z]+)", None, None, "{verb}", strict=True),
)

# Each category gets a few prototype phrases in the same subject-less third-person form as
# the fact texts; a clause is classified by its best cosine to them.
PROTOTYPES: dict[str, tuple[str, ...]] = {
    "occupation": (
        "works as a nurse in a hospital",
        "is a software engineer at a tech company",
        "is a teacher",
        "works as an accountant",
        "runs a small business",
        "is a lawyer",
        "is a doctor",
        "works in marketing",
        "is a chef in a restaurant",
        "is an electrician",
        "is an engineer",
        "is a designer",
        "is a manager",
        "is a scientist",
        "is a mechanic",
        "works as a professional in their field",
    ),
    "education": (
        "studied computer science at university",
        "is a student",
        "has a degree in biology",
        "is doing a PhD",
        "is learning a foreign language",
        "graduated from college",
    ),
    "hobby": (
        "enjoys hiking in the mountains",
        "plays the guitar",
        "restores old motorbikes",
        "paints watercolours on weekends",
        "likes gardening",
        "plays football with friends",
        "collects stamps",
        "goes running every morning",
        "is a keen photographer",
    ),
    "family": (
        "has two kids",
        "is married",
        "has a daughter",
        "is a mother of three",
        "has a dog",
        "takes care of elderly parents",
        "their wife is a teacher",
    ),
    "preference": (
        "loves spicy food",
        "prefers tea to coffee",
        "is vegetarian",
        "hates cold weather",
        "likes jazz music",
        "their favourite film is a comedy",
        "is a big fan of science fiction",
    ),
    "concern": (
        "is worried about an upcoming exam",
        "is stressed about work",
        "is looking for a new job",
        "is preparing for a job interview",
        "is struggling with sleep",
        "is going through a divorce",
        "is saving money to buy a house",
    ),
    "location": (
        "lives in Paris",
        "is from Brazil",
        "moved to a new city",
        "lives in a small town near the coast",
    ),
}
# Below this best-prototype cosine an open-ended clause is not considered background.
OPEN_MIN_SIMILARITY = 0.2
