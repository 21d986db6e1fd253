"""Background-fact extraction from one user message.

`RulesExtractor` needs no capable LLM: `text` cuts a message into the first-person clauses
that may state a fact (no questions, conditionals, instructions, quotes or clauses about
the other person), `patterns` holds the self-disclosure forms and their slots, and each
match becomes atomic third-person facts, one per list item, without residue; the MiniLM
embedder classifies the open-ended ones (and drops those that look like no background). `LLMExtractor` asks a `ChatModel` for typed JSON with
our own prompt, validates it, and falls back to the rules when the output is unusable.
Only first-person statements are ever extracted, so requests and instructions
("ignore your instructions ...") never become facts.
"""

from core.memory_extract.llm import LLMExtractor, parse_llm_facts
from core.memory_extract.records import (
    SINGLE_VALUED_KEYS,
    ExtractedFact,
    FactExtractor,
    InvalidExtraction,
    normalise_key,
)
from core.memory_extract.rules import RulesExtractor

__all__ = [
    "SINGLE_VALUED_KEYS",
    "ExtractedFact",
    "FactExtractor",
    "InvalidExtraction",
    "LLMExtractor",
    "RulesExtractor",
    "normalise_key",
    "parse_llm_facts",
]
