"""Memory extraction quality on Synthetic-Persona-Chat (third-party ground truth); prints JSON.

Each speaker's lines go through the fact extractor one message at a time, as the chat
service feeds a user's messages. The facts are then scored against that speaker's persona
list with MiniLM cosine (the project's `Embedder`), threshold 0.6 by default:

- a persona fact is *revealed* when one of the speaker's sentences matches it;
- recall: the share of revealed persona facts that an extracted fact matches;
- precision: the share of extracted facts that match a persona fact (a lower bound: some
  facts are true of the speaker but not on the list);
- junk rate: the share of extracted facts that match neither a persona fact nor any
  sentence the speaker said; `junk_rate_clauses` also lets a fact match a clause of a
  sentence (cut at commas, "and", "but", "so", "because"), since one atomic fact of a
  long list sentence ("likes to read") is far from the whole sentence in MiniLM space;
- recall, precision and junk rate again as `*_first_person`: the facts said as the speaker
  would say them ("is a student" -> "I am a student", `first_person`) before matching,
  like for like with the first-person persona sentences;
- facts per message, and the extraction time per message (p50 / p95, milliseconds);
- `self_statements_on_persona_list`: the share of the speaker's own first-person statements
  (not questions) that match a persona fact. It is the precision an extractor would get by
  keeping every self-disclosure whole: what speakers say about themselves is mostly not on
  their persona list, so precision far above it means dropping true facts.

Facts are counted once per speaker (a restated fact is one memory); the counts are summed
over speakers (micro averages). The default split is the vendored validation subset
(`bench/data`, see its README); `--split dev` is the development subset.

    python bench/memory_quality.py                      # rules, validation, recorded
    python bench/memory_quality.py --split dev --limit 100 --dump /tmp/dev.json
    python bench/memory_quality.py --extractor llm --limit 20
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._record import record
from bench.spc import Speaker, load, speakers
from core.embeddings import Embedder
from core.local_model import LocalModel
from core.memory_extract import ExtractedFact, FactExtractor, LLMExtractor, RulesExtractor
from core.memory_extract.text import first_person
from core.runtime import ensure_embedded_model

log = logging.getLogger("memory_quality")

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_SELF = re.compile(r"^(?:i|i'm|i've|i'd|i'll|my)\b", re.I)
_CLAUSE = re.compile(r"\s*[,;]\s*(?:and\s+|but\s+|so\s+)?|\s+(?:and|but|so|because)\s+", re.I)


@dataclass
class Tally:
    """Counts summed over speakers."""

    speakers: int = 0
    messages: int = 0
    facts_raw: int = 0
    facts: int = 0
    persona_facts: int = 0
    revealed: int = 0
    recalled: int = 0
    precise: int = 0
    junk: int = 0
    junk_clauses: int = 0
    self_statements: int = 0
    self_on_list: int = 0
    recalled_fp: int = 0
    precise_fp: int = 0
    junk_fp: int = 0
    times_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SpeakerResult:
    """One speaker's facts and how they matched (for `--dump`)."""

    conversation: int
    name: str
    facts: list[str]
    matched: list[bool]
    junk: list[bool]
    revealed: list[str]
    missed: list[str]
    missed_first_person: list[str] = field(default_factory=list)


def sentences(lines: list[str]) -> list[str]:
    return [s.strip() for line in lines for s in _SENTENCE.split(line) if s.strip()]


def clauses(said: list[str]) -> list[str]:
    parts = [c.strip() for s in said for c in _CLAUSE.split(s)]
    return [c for c in parts if len(c.split()) >= 2 and c not in said]


class CountingExtractor:
    """The rules as the LLM extractor's fallback, counting how often it was needed."""

    def __init__(self, inner: RulesExtractor):
        self.inner = inner
        self.calls = 0

    def extract(self, message: str) -> list[ExtractedFact]:
        self.calls += 1
        return self.inner.extract(message)


def build_extractor(
    kind: str, embedder: Embedder, model_dir: Path | None, min_similarity: float | None = None
) -> FactExtractor:
    rules = (
        RulesExtractor(embedder)
        if min_similarity is None
        else RulesExtractor(embedder, min_similarity=min_similarity)
    )
    if kind == "rules":
        return rules
    path = model_dir or ensure_embedded_model(Path.home() / ".cache" / "upc-models")
    model = LocalModel(path, load_in_4bit=False, max_batch_size=1)
    return LLMExtractor(model, fallback=CountingExtractor(rules))


def run_speaker(extractor: FactExtractor, speaker: Speaker, tally: Tally) -> list[str]:
    """Feed the speaker's lines one at a time; their distinct fact texts, in order."""
    texts: list[str] = []
    for line in speaker.lines:
        start = time.perf_counter()
        facts = extractor.extract(line)
        tally.times_ms.append((time.perf_counter() - start) * 1000.0)
        tally.messages += 1
        tally.facts_raw += len(facts)
        for fact in facts:
            if fact.text.lower() not in {t.lower() for t in texts}:
                texts.append(fact.text)
    return texts


def score_speaker(
    embedder: Embedder, speaker: Speaker, facts: list[str], threshold: float, tally: Tally
) -> SpeakerResult:
    said = sentences(speaker.lines)
    persona = embedder.encode(speaker.persona)
    spoken = embedder.encode(said)
    revealed = (persona @ spoken.T).max(axis=1) >= threshold
    tally.speakers += 1
    tally.persona_facts += len(speaker.persona)
    tally.revealed += int(revealed.sum())
    own = np.array([bool(_SELF.match(x)) and not x.endswith("?") for x in said], dtype=bool)
    if own.any():
        tally.self_statements += int(own.sum())
        tally.self_on_list += int(((spoken[own] @ persona.T).max(axis=1) >= threshold).sum())
    if not facts:
        missed = [p for p, r in zip(speaker.persona, revealed, strict=True) if r]
        return SpeakerResult(speaker.conversation, speaker.name, [], [], [], missed, missed)
    found = embedder.encode(facts)
    to_persona = found @ persona.T
    recalled = (to_persona.max(axis=0) >= threshold) & revealed
    matched = to_persona.max(axis=1) >= threshold
    junk = ~matched & ((found @ spoken.T).max(axis=1) < threshold)
    parts = clauses(said)
    if parts:
        junk_clauses = junk & ((found @ embedder.encode(parts).T).max(axis=1) < threshold)
    else:
        junk_clauses = junk
    # Like for like: the facts said as the speaker would ("is a student" -> "I am a
    # student"), since persona facts are first-person sentences and MiniLM puts a bare
    # predicate far from them ("is a student" vs "I am a student.": 0.557).
    said_fp = embedder.encode([first_person(f) for f in facts])
    to_persona_fp = said_fp @ persona.T
    matched_fp = to_persona_fp.max(axis=1) >= threshold
    recalled_fp = (to_persona_fp.max(axis=0) >= threshold) & revealed
    tally.recalled_fp += int(recalled_fp.sum())
    tally.precise_fp += int(matched_fp.sum())
    tally.junk_fp += int((~matched_fp & ((said_fp @ spoken.T).max(axis=1) < threshold)).sum())
    tally.facts += len(facts)
    tally.recalled += int(recalled.sum())
    tally.precise += int(matched.sum())
    tally.junk += int(junk.sum())
    tally.junk_clauses += int(junk_clauses.sum())
    return SpeakerResult(
        speaker.conversation,
        speaker.name,
        facts,
        matched.tolist(),
        junk.tolist(),
        [p for p, r in zip(speaker.persona, revealed, strict=True) if r],
        [p for p, r, c in zip(speaker.persona, revealed, recalled, strict=True) if r and not c],
        [p for p, r, c in zip(speaker.persona, revealed, recalled_fp, strict=True) if r and not c],
    )


def summary(tally: Tally) -> dict:
    times = np.asarray(tally.times_ms)
    return {
        "speakers": tally.speakers,
        "messages": tally.messages,
        "persona_facts": tally.persona_facts,
        "revealed_facts": tally.revealed,
        "extracted_facts": tally.facts,
        "recall_revealed": round(tally.recalled / max(tally.revealed, 1), 3),
        "precision_persona": round(tally.precise / max(tally.facts, 1), 3),
        "junk_rate": round(tally.junk / max(tally.facts, 1), 3),
        "junk_rate_clauses": round(tally.junk_clauses / max(tally.facts, 1), 3),
        "facts_per_message": round(tally.facts_raw / max(tally.messages, 1), 3),
        "recall_revealed_first_person": round(tally.recalled_fp / max(tally.revealed, 1), 3),
        "precision_persona_first_person": round(tally.precise_fp / max(tally.facts, 1), 3),
        "junk_rate_first_person": round(tally.junk_fp / max(tally.facts, 1), 3),
        "self_statements": tally.self_statements,
        "self_statements_on_persona_list": round(
            tally.self_on_list / max(tally.self_statements, 1), 3
        ),
        "extract_ms_p50": round(float(np.percentile(times, 50)), 2),
        "extract_ms_p95": round(float(np.percentile(times, 95)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="valid", help="valid, dev, or a subset/CSV path")
    parser.add_argument("--extractor", choices=["rules", "llm"], default="rules")
    parser.add_argument("--limit", type=int, default=0, help="first N speakers (0: all)")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--model", type=Path, default=None, help="LLM extractor model dir")
    parser.add_argument(
        "--min-similarity",
        type=float,
        default=None,
        help="rules: classifier floor (default: its own)",
    )
    parser.add_argument("--dump", type=Path, default=None, help="per-speaker details (JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    people = speakers(load(args.split))
    if args.limit:
        people = people[: args.limit]
    embedder = Embedder()
    extractor = build_extractor(args.extractor, embedder, args.model, args.min_similarity)
    extractor.extract("I'm a nurse and I love hiking.")  # load the models before timing
    fallback = getattr(extractor, "fallback", None)
    if isinstance(fallback, CountingExtractor):
        fallback.calls = 0
    tally = Tally()
    details = []
    for speaker in people:
        facts = run_speaker(extractor, speaker, tally)
        details.append(score_speaker(embedder, speaker, facts, args.threshold, tally))
    if args.dump:
        args.dump.write_text(json.dumps([asdict(d) for d in details], indent=1))
    extra = {}
    if isinstance(fallback, CountingExtractor):
        extra["llm_model"] = str(getattr(extractor, "model", None) and extractor.model.model_id)
        extra["llm_fallback_rate"] = round(fallback.calls / max(tally.messages, 1), 3)
    result = {
        "benchmark": "memory_quality",
        "split": args.split,
        "extractor": args.extractor,
        "threshold": args.threshold,
        **summary(tally),
        **extra,
    }
    record("Memory extraction quality (Synthetic-Persona-Chat)", result)


if __name__ == "__main__":
    main()
