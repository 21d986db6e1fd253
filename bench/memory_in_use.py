"""Memory in use, on Synthetic-Persona-Chat speakers (third-party ground truth); prints JSON.

For each speaker, their lines are ingested one message at a time into a real
`MemoryService` (SQLite + Chroma in a temp dir, the rules extractor, MiniLM), as the chat
service does with a user's messages. Then:

- **retrieval**: for each persona fact the speaker revealed, the message that drew it out
  (the other speaker's line just before) is the query; the stored facts that match the
  persona fact (MiniLM cosine >= 0.6) are the relevant ones. Reported: hit@1, hit@3 and
  MRR of `MemoryService.recall` (top 5), next to what a random order of the same facts
  would score (hit@1).
- **replies** (`--replies`, needs the chat model): a new conversation through the real
  `ChatService` with the embedded model; the greeting (built from the memory profile) and
  the reply to the speaker's first line of their conversation are the first two replies.
  A reply uses a remembered fact when one of its sentences matches a stored fact
  (cosine >= 0.6; 0.5 reported too). Reported: the share of speakers whose first two
  replies use one.

    python bench/memory_in_use.py --speakers 100 --replies        # the recorded run
    python bench/memory_in_use.py --speakers 20                   # retrieval only, quick
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._record import record
from bench.memory_quality import sentences
from bench.spc import Speaker, load, speakers
from chatbot.chat import ReplyEvent
from chatbot.memory import MemoryService
from chatbot.services import Services, build_services
from core.embeddings import Embedder
from core.runtime import ensure_embedded_model
from core.settings import load_settings
from storage import Database
from storage.models import User

log = logging.getLogger("memory_in_use")


@dataclass
class Retrieval:
    queries: int = 0
    unanswerable: int = 0  # the revealed fact was never stored: nothing relevant to find
    hit1: int = 0
    hit3: int = 0
    reciprocal: float = 0.0
    random_hit1: float = 0.0


@dataclass
class Replies:
    speakers: int = 0
    with_memory: int = 0  # speakers with at least one stored fact
    used: int = 0  # first two replies use a stored fact (cosine >= threshold)
    used_loose: int = 0  # ... at cosine >= 0.5
    greeting_used: int = 0
    reply_used: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)


def _previous_other_line(speaker: Speaker, conversation: list[tuple[str, str]], line: str) -> str:
    """The other speaker's line just before `line` (the message that drew it out)."""
    for i, (who, text) in enumerate(conversation):
        if who == speaker.name and text == line:
            for j in range(i - 1, -1, -1):
                if conversation[j][0] != speaker.name:
                    return conversation[j][1]
            return ""
    return ""


def score_retrieval(
    memory: MemoryService,
    embedder: Embedder,
    uid: str,
    speaker: Speaker,
    conversation: list[tuple[str, str]],
    threshold: float,
    out: Retrieval,
) -> None:
    stored = memory.list_facts(uid)
    if not stored:
        return
    said = sentences(speaker.lines)
    persona = embedder.encode(speaker.persona)
    sims_said = persona @ embedder.encode(said).T
    facts = embedder.encode([f.text for f in stored])
    sims_facts = persona @ facts.T
    for p in range(len(speaker.persona)):
        best = int(sims_said[p].argmax())
        if sims_said[p, best] < threshold:
            continue  # not revealed
        line = next(ln for ln in speaker.lines if said[best] in ln)
        query = _previous_other_line(speaker, conversation, line)
        if not query:
            continue
        relevant = {stored[i].id for i in np.flatnonzero(sims_facts[p] >= threshold)}
        out.queries += 1
        if not relevant:
            out.unanswerable += 1
            continue
        ranked = [f.id for f in memory.recall(uid, query, top_k=5, token_budget=100_000)]
        rank = next((i for i, fid in enumerate(ranked) if fid in relevant), None)
        if rank is not None:
            out.hit1 += rank == 0
            out.hit3 += rank < 3
            out.reciprocal += 1.0 / (rank + 1)
        out.random_hit1 += len(relevant) / len(stored)


def _reply_text(events: Iterable[ReplyEvent]) -> str:
    return "".join(e.text for e in events if e.kind == "delta")


def score_replies(
    services: Services,
    uid: str,
    speaker: Speaker,
    threshold: float,
    out: Replies,
) -> None:
    memory, chat, embedder = services.memory, services.chat, services.embedder
    assert memory is not None
    stored = memory.list_facts(uid)
    out.speakers += 1
    if not stored:
        return
    out.with_memory += 1
    cid = chat.create_conversation(uid)
    greeting = _reply_text(chat.stream_greeting(uid, cid))
    reply = _reply_text(chat.send(uid, cid, speaker.lines[0]))
    facts = embedder.encode([f.statement for f in stored])
    best = []
    for text in (greeting, reply):
        parts = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s] or [""]
        best.append(float((embedder.encode(parts) @ facts.T).max()))
    out.greeting_used += best[0] >= threshold
    out.reply_used += best[1] >= threshold
    out.used += max(best) >= threshold
    out.used_loose += max(best) >= 0.5
    if len(out.examples) < 3:
        out.examples.append(
            {"facts": "; ".join(f.text for f in stored[:4]), "greeting": greeting, "reply": reply}
        )


def _user(db: Database, name: str) -> str:
    with db.session() as session:
        user = User(username=name)
        session.add(user)
        session.flush()
        return user.id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="valid")
    parser.add_argument("--speakers", type=int, default=100)
    parser.add_argument("--replies", action="store_true", help="also the first two replies")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threshold", type=float, default=0.6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    conversations = {c.row: c for c in load(args.split)}
    people = speakers(list(conversations.values()))[: args.speakers]
    root = Path(tempfile.mkdtemp(prefix="upc-memory-in-use-"))
    data_dir = root / "data"
    (data_dir / "models").mkdir(parents=True)
    embedded = ensure_embedded_model(Path.home() / ".cache" / "upc-models")
    os.symlink(embedded, data_dir / "models" / embedded.name)
    settings = load_settings(
        env={
            "UPC_GENERATION__MAX_NEW_TOKENS": str(args.max_new_tokens),
            "UPC_LIMITS__MESSAGES_PER_MINUTE": "0",
            "UPC_LEARNER__SCHEDULER_ENABLED": "false",
        },
        data_dir=data_dir,
    )
    services = build_services(settings)
    memory = services.memory
    assert memory is not None
    retrieval, replies = Retrieval(), Replies()
    try:
        for n, speaker in enumerate(people):
            uid = _user(services.db, f"spc-{speaker.conversation}-{n}")
            for line in speaker.lines:
                memory.remember(uid, line)
            turns = conversations[speaker.conversation].turns
            score_retrieval(
                memory, services.embedder, uid, speaker, turns, args.threshold, retrieval
            )
            if args.replies:
                score_replies(services, uid, speaker, args.threshold, replies)
    finally:
        services.close()
        shutil.rmtree(root, ignore_errors=True)
    answerable = max(retrieval.queries - retrieval.unanswerable, 1)
    result: dict = {
        "benchmark": "memory_in_use",
        "split": args.split,
        "speakers": len(people),
        "threshold": args.threshold,
        "retrieval": {
            "queries": retrieval.queries,
            "fact_never_stored": retrieval.unanswerable,
            "hit_at_1": round(retrieval.hit1 / answerable, 3),
            "hit_at_3": round(retrieval.hit3 / answerable, 3),
            "mrr_at_5": round(retrieval.reciprocal / answerable, 3),
            "random_order_hit_at_1": round(retrieval.random_hit1 / answerable, 3),
        },
    }
    if args.replies:
        result["replies"] = {
            "model": settings.chatbot.model,
            "max_new_tokens": args.max_new_tokens,
            "speakers_with_memory": replies.with_memory,
            "first_two_replies_use_a_fact": round(replies.used / max(replies.speakers, 1), 3),
            "at_cosine_0.5": round(replies.used_loose / max(replies.speakers, 1), 3),
            "greeting_uses_a_fact": round(replies.greeting_used / max(replies.speakers, 1), 3),
            "reply_uses_a_fact": round(replies.reply_used / max(replies.speakers, 1), 3),
            "examples": replies.examples,
        }
    record("Memory in use (Synthetic-Persona-Chat)", result)


if __name__ == "__main__":
    main()
