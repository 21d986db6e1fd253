"""Offline, deterministic composer of the ISCO-800 backgrounds.

Each background is assembled from curated pools (`data/occupations.json`, `data/pools.json`)
with many sentence patterns per element and a random element order, so two users of the
same group differ in structure, not only in the filled-in slots. Everything is drawn from
`random.Random` seeded with strings, which is stable across runs and platforms.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from personas.records import SPLITS, Persona, Traits, word_count
from personas.taxonomy import Taxonomy, load_taxonomy

__all__ = [
    "COMPOSER_VERSION",
    "DEFAULT_SEED",
    "GROUPS_PER_SPLIT",
    "MAX_WORDS",
    "MIN_WORDS",
    "SETBACKS_PER_GROUP",
    "SHIPPED_SET",
    "USERS_PER_GROUP",
    "BuildResult",
    "SplitPlan",
    "build_isco800",
    "dumps_jsonl",
    "load_pools",
    "meta_json",
    "plan_splits",
]

COMPOSER_VERSION = "1"
DEFAULT_SEED = 800
SHIPPED_SET = "isco800"
USERS_PER_GROUP = 20
SETBACKS_PER_GROUP = 7  # 35% of users, above the 25% floor
GROUPS_PER_SPLIT: dict[str, int] = {"train": 25, "validation": 5, "test": 10}
MIN_WORDS = 50
MAX_WORDS = 100
_MAX_TRIES = 400

# Sentence patterns per element. Keys are filled from the context built in `_Person.ctx`.
_INTRO = (
    "{full} is a {age}-year-old {title} in {city}.",
    "{full}, {age}, works as {a_title} in {city}.",
    "At {age}, {full} is {a_title} at {place} in {city}.",
    "{full} has spent most of {poss} {age} years in {city} and now works as {a_title}.",
    "Born in {origin}, {full} ({age}) now lives in {city}, where {pron} works as {a_title}.",
    "{city} is home to {full}, a {age}-year-old {title}.",
    "{full} is {a_title} from {city}; {pron} turned {age} this year.",
    "Meet {full}, {age}, {a_title} working for {place} in {city}.",
    "{full}, a {age}-year-old from {city}, has worked as {a_title} at {place} for {years} years.",
    "Ask {full} what {pron} does and you will hear that {pron} is {a_title} in {city}; {pron} is {age}.",
)
_INTRO_PERSONALITY = (
    "Known as {traits} but also {flaws}, {full} ({age}) works as {a_title} in {city}.",
    "{traits_cap} yet {flaws}: that is how friends sum up {full}, a {age}-year-old {title} in {city}.",
)
_ROLE = (
    "{Subj} {duty}.",
    "At {place}, {pron} {duty}.",
    "Most days {pron} {duty}, and {pron} also {duty2}.",
    "Working for {place}, {pron} {duty}.",
    "These days {first} {duty}.",
    "{Subj} {duty} and {duty2}.",
    "{Subj} joined {place} {years} years ago and {duty}.",
    "The job is demanding: {pron} {duty}.",
    "On a typical week {pron} {duty}.",
)
_CAREER = (
    "{Subj} started out as {a_early}.",
    "Before this, {pron} spent {early_years} as {a_early}.",
    "{Poss} working life began as {a_early}.",
    "{first} drifted into the field after working as {a_early}.",
    "{Subj} was {a_early} for {early_years} before switching to this work.",
    "After a spell as {a_early}, {pron} moved on to {place}.",
    "Years ago {pron} was {a_early}, a period {pron} remembers with mixed feelings.",
)
_EDUCATION = (
    "{Subj} {edu}.",
    "As for schooling, {pron} {edu}.",
    "Back in {home}, {pron} {edu}.",
    "{Subj} {edu}, something {pron} brings up more often than needed.",
    "In {poss} youth {pron} {edu}.",
    "Long before the current job, {first} {edu}.",
)
_EDUCATION_CAREER = (
    "After {pron} {edu}, {pron} worked as {a_early} for {early_years}.",
    "{Subj} {edu} and then started out as {a_early}.",
    "{Subj} {edu}; {poss} first job was as {a_early}.",
)
_PERSONALITY = (
    "{Subj} is {traits}, but {pron} can be {flaws}.",
    "Friends call {obj} {traits}; colleagues add that {pron} is {flaws}.",
    "{first} is {traits}. The weak spot: {pron} is {flaws}.",
    "People who know {first} describe {obj} as {traits} and, less kindly, as {flaws}.",
    "Though {traits}, {pron} is also {flaws}.",
    "{Subj} is {flaws}, yet those close to {obj} know {obj} as {traits}.",
    "By temperament {pron} is {traits}; on bad days {pron} is {flaws}.",
    "Coworkers find {obj} {traits} but {flaws}.",
    "{first} would call {obj}self {traits}; others mostly notice that {pron} is {flaws}.",
)
_HOBBIES = (
    "Outside work, {pron} enjoys {hobbies}.",
    "Weekends are for {hobbies}.",
    "{Subj} unwinds with {hobbies}.",
    "{Poss} free time goes to {hobbies}.",
    "In the evenings {first} loves {hobbies}.",
    "{Subj} is passionate about {hobbies}.",
    "Few colleagues know that {pron} loves {hobbies}.",
    "Off duty, {first} is usually busy with {hobbies}.",
    "{Poss} idea of a good Sunday involves {hobbies}.",
)
_SETBACK = (
    "{Subj} {setback}, {aftermath}.",
    "Not everything has gone well: {pron} {setback}.",
    "A low point came {ago} when {pron} {setback}.",
    "{first} {setback} {ago}, {aftermath}.",
    "{first} rarely mentions that {pron} once {setback}.",
    "Earlier in {poss} career, {pron} {setback}.",
    "{ago_cap}, {pron} {setback}.",
)
_EXTRA_GOAL = ("{Subj} {goal}.", "Looking ahead, {pron} {goal}.", "Privately, {first} {goal}.")
_EXTRA_FAMILY = ("{Subj} {family}.", "At home, {first} {family}.")

_ELEMENTS: dict[str, tuple[str, ...]] = {
    "role": _ROLE,
    "career": _CAREER,
    "education": _EDUCATION,
    "education_career": _EDUCATION_CAREER,
    "personality": _PERSONALITY,
    "hobbies": _HOBBIES,
    "setback": _SETBACK,
    "goal": _EXTRA_GOAL,
    "family": _EXTRA_FAMILY,
}

_PRONOUNS = {
    "female": {"pron": "she", "Pron": "She", "poss": "her", "Poss": "Her", "obj": "her"},
    "male": {"pron": "he", "Pron": "He", "poss": "his", "Poss": "His", "obj": "him"},
}
_SELF = {"her": "herself", "him": "himself"}


@dataclass(frozen=True)
class SplitPlan:
    """Which 40 of the 43 sub-major groups are used and which split each one serves."""

    seed: int
    excluded: tuple[str, ...]
    split_of: dict[str, str]

    def groups(self, split: str) -> tuple[str, ...]:
        return tuple(sorted(code for code, s in self.split_of.items() if s == split))


@dataclass
class BuildResult:
    personas: list[Persona]
    plan: SplitPlan
    # Per persona id, the sentence-pattern signature (element order and pattern numbers).
    signatures: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)


def load_pools() -> tuple[dict[str, Any], dict[str, Any]]:
    """The curated composer pools: (occupations by sub-major code, generic pools)."""
    data = resources.files("personas").joinpath("data")
    occupations = json.loads(data.joinpath("occupations.json").read_text(encoding="utf-8"))
    pools = json.loads(data.joinpath("pools.json").read_text(encoding="utf-8"))
    return occupations, pools


def plan_splits(taxonomy: Taxonomy, seed: int = DEFAULT_SEED) -> SplitPlan:
    """Draw 40 of the 43 groups, then deal them 25/5/10 into train/validation/test."""
    rng = random.Random(f"isco800-split:{seed}")
    codes = list(taxonomy.codes)
    used = sum(GROUPS_PER_SPLIT.values())
    excluded = tuple(sorted(rng.sample(codes, len(codes) - used)))
    chosen = [c for c in codes if c not in excluded]
    rng.shuffle(chosen)
    split_of: dict[str, str] = {}
    start = 0
    for split in SPLITS:
        for code in chosen[start : start + GROUPS_PER_SPLIT[split]]:
            split_of[code] = split
        start += GROUPS_PER_SPLIT[split]
    return SplitPlan(seed=seed, excluded=excluded, split_of=split_of)


def _article(phrase: str) -> str:
    first = phrase.split()[0]
    if first.isupper() and len(first) > 1:
        vowel_sound = first[0] in "AEFHILMNORSX"
    else:
        lower = first.lower()
        vowel_sound = lower[0] in "aeiou" and not lower.startswith(("uni", "use", "eu", "one"))
    return f"{'an' if vowel_sound else 'a'} {phrase}"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _span(years: int) -> str:
    return "a year" if years == 1 else f"{years} years"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass
class _Draft:
    name: str
    text: str
    signature: tuple[tuple[str, int], ...]
    traits: Traits


class _GroupComposer:
    """Composes the users of one sub-major group from its own seeded generator."""

    def __init__(self, code: str, occupations: dict[str, Any], pools: dict[str, Any], seed: int):
        self.code = code
        self.occ = occupations[code]
        self.pools = pools
        self.rng = random.Random(f"isco800-compose:{seed}:{code}")
        roles = list(range(len(self.occ["roles"])))
        self.rng.shuffle(roles)
        self.role_order = roles
        # Within a group, no repeated given name and at most two users per culture.
        self.given_names: set[str] = set()
        self.cultures: dict[str, int] = {}

    def _name(self, taken: set[str]) -> tuple[str, str, str, dict[str, Any]]:
        rng = self.rng
        while True:
            culture = rng.choice(self.pools["cultures"])
            gender = rng.choice(("female", "male"))
            given = rng.choice(culture[gender])
            surname = rng.choice(culture["surnames"])
            if gender == "female":
                surname += culture.get("female_surname_suffix", "")
            full = f"{surname} {given}" if culture.get("family_first") else f"{given} {surname}"
            if (
                full not in taken
                and given not in self.given_names
                and self.cultures.get(culture["name"], 0) < 2
            ):
                taken.add(full)
                self.given_names.add(given)
                self.cultures[culture["name"]] = self.cultures.get(culture["name"], 0) + 1
                return full, given, gender, culture

    def compose(self, index: int, taken_names: set[str], taken_signatures: set) -> _Draft:
        rng = self.rng
        full, given, gender, culture = self._name(taken_names)
        role = self.occ["roles"][self.role_order[index % len(self.role_order)]]
        pronouns = _PRONOUNS[gender]
        home = rng.choice(culture["cities"])
        if rng.random() < 0.15:
            other = rng.choice([c for c in self.pools["cultures"] if c is not culture])
            city = rng.choice(other["cities"])
        else:
            city = home
        origin = home if home != city else rng.choice(culture["cities"])
        for _ in range(_MAX_TRIES):
            draft = self._attempt(
                index=index, full=full, given=given, pronouns=pronouns, role=role,
                city=city, home=home, origin=origin,
            )  # fmt: skip
            if (
                MIN_WORDS <= word_count(draft.text) <= MAX_WORDS
                and draft.signature not in taken_signatures
            ):
                taken_signatures.add(draft.signature)
                return draft
        raise RuntimeError(f"could not compose user {index} of group {self.code}")

    def _attempt(self, *, index, full, given, pronouns, role, city, home, origin):  # type: ignore[no-untyped-def]
        rng = self.rng
        pools = self.pools
        title, duties = role["title"], role["duties"]
        age = rng.randint(24, 63)
        years = rng.randint(2, max(2, min(30, age - 22)))
        duty_a, duty_b = rng.sample(duties, 2) if len(duties) > 1 else (duties[0], duties[0])
        traits = rng.sample(pools["traits"], rng.choice((1, 2, 2, 3)))
        flaws = rng.sample(pools["flaws"], rng.choice((1, 1, 1, 2)))
        hobbies = rng.sample(pools["hobbies"], rng.choice((1, 2, 2, 3)))
        has_setback = index < SETBACKS_PER_GROUP
        setback_kind = setback = None
        fill = dict(pronouns)
        if has_setback:
            setback_kind, setback_template = rng.choice(pools["setbacks"])
            setback = setback_template.format_map(fill)
        ctx: dict[str, Any] = {
            **pronouns,
            "full": full,
            "first": given,
            "age": age,
            "years": years,
            "early_years": _span(rng.randint(1, 6)),
            "city": city,
            "home": home,
            "origin": origin,
            "title": title,
            "a_title": _article(title),
            "place": rng.choice(role["places"]),
            "duty": duty_a,
            "duty2": duty_b,
            "edu": rng.choice(role.get("education") or self.occ["education"]),
            "a_early": rng.choice(self.occ["early"]),
            "traits": _join(traits),
            "traits_cap": _cap(_join(traits)),
            "flaws": _join(flaws),
            "hobbies": _join(hobbies),
            "setback": setback or "",
            "aftermath": rng.choice(pools["aftermaths"]).format_map(fill),
            "ago": rng.choice(("a few years ago", "some time ago", "not long ago", "years ago")),
            "goal": rng.choice(pools["goals"]),
            "family": rng.choice(pools["family"]),
        }
        ctx["ago_cap"] = _cap(ctx["ago"])

        elements = ["role", "personality", "hobbies"]
        elements += ["education_career"] if rng.random() < 0.3 else ["education", "career"]
        if has_setback:
            elements.append("setback")
        elements += [extra for extra in ("goal", "family") if rng.random() < 0.3]
        rng.shuffle(elements)
        used_place = False
        sentences: list[str] = []
        signature: list[tuple[str, int]] = []
        if rng.random() < 0.15:
            elements.remove("personality")
            pattern = rng.randrange(len(_INTRO_PERSONALITY))
            sentences.append(_INTRO_PERSONALITY[pattern].format_map(ctx))
            signature.append(("intro_personality", pattern))
        else:
            pattern = rng.randrange(len(_INTRO))
            if home == city and "{origin}" in _INTRO[pattern]:
                pattern = 0
            sentences.append(_INTRO[pattern].format_map(ctx))
            signature.append(("intro", pattern))
            used_place = "{place}" in _INTRO[pattern]
        for element in elements:
            patterns = _ELEMENTS[element]
            pattern = rng.randrange(len(patterns))
            template = patterns[pattern]
            if "{place}" in template and used_place:
                pattern = 0
                template = patterns[0]
            used_place = used_place or "{place}" in template
            subject = given if rng.random() < 0.35 else pronouns["Pron"]
            sentence = template.format_map({**ctx, "Subj": subject})
            sentence = sentence.replace(f"{pronouns['obj']}self", _SELF[pronouns["obj"]])
            sentences.append(sentence)
            signature.append((element, pattern))
        text = " ".join(sentences)
        record = Traits(
            occupation=title,
            education=ctx["edu"],
            personality=tuple(traits),
            flaws=tuple(flaws),
            hobbies=tuple(hobbies),
            setback=setback,
            setback_kind=setback_kind,
            age=age,
            location=city,
            workplace=ctx["place"] if used_place else "",
        )
        return _Draft(name=full, text=text, signature=tuple(signature), traits=record)


def build_isco800(
    seed: int = DEFAULT_SEED,
    taxonomy: Taxonomy | None = None,
    pools: tuple[dict[str, Any], dict[str, Any]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Compose the 800 users (40 groups x 20). Same seed, same pools -> same records."""
    taxonomy = taxonomy or load_taxonomy()
    occupations, generic = pools or load_pools()
    plan = plan_splits(taxonomy, seed)
    taken_names: set[str] = set()
    personas: list[Persona] = []
    signatures: dict[str, tuple[tuple[str, int], ...]] = {}
    ordered = [code for split in SPLITS for code in plan.groups(split)]
    for done, code in enumerate(ordered):
        group = taxonomy.sub_major(code)
        composer = _GroupComposer(code, occupations, generic, seed)
        taken_signatures: set = set()
        drafts = [
            composer.compose(i, taken_names, taken_signatures) for i in range(USERS_PER_GROUP)
        ]
        # Setbacks went to the first users; shuffle so ids do not reveal who has one.
        order = list(range(USERS_PER_GROUP))
        composer.rng.shuffle(order)
        for number, i in enumerate(order, start=1):
            draft = drafts[i]
            persona = Persona(
                id=f"{SHIPPED_SET}:{code}-{number:02d}",
                name=draft.name,
                background=draft.text,
                split=plan.split_of[code],
                isco_code=code,
                isco_title=group.title,
                source=SHIPPED_SET,
                traits=draft.traits,
            )
            personas.append(persona)
            signatures[persona.id] = draft.signature
        if progress is not None:
            progress(done + 1, len(ordered))
    return BuildResult(personas=personas, plan=plan, signatures=signatures)


def dumps_jsonl(personas: Sequence[Persona]) -> str:
    """Canonical JSONL: one record per line, fixed key order, UTF-8 text, trailing newline."""
    return "".join(
        json.dumps(p.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n" for p in personas
    )


def meta_json(result: BuildResult, jsonl_text: str) -> str:
    """The build record: seed, excluded groups, split assignment and a content hash."""
    plan = result.plan
    meta = {
        "name": SHIPPED_SET,
        "seed": plan.seed,
        "composer_version": COMPOSER_VERSION,
        "users": len(result.personas),
        "users_per_group": USERS_PER_GROUP,
        "setbacks_per_group": SETBACKS_PER_GROUP,
        "excluded_groups": list(plan.excluded),
        "groups": {split: list(plan.groups(split)) for split in SPLITS},
        "sha256": hashlib.sha256(jsonl_text.encode("utf-8")).hexdigest(),
    }
    return json.dumps(meta, ensure_ascii=False, indent=2) + "\n"
