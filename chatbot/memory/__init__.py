"""Per-user background memory: SQLite holds the facts (the truth), Chroma the vector index.

Every read and write is scoped to one user id by this code; a missing or unknown user id
fails closed (`MemoryScopeError`). Chroma is optional at run time: when it fails, the
service logs a warning and carries on with the vectors kept in SQLite, so a chat turn
never fails because of memory. Writes commit to SQLite first; `rebuild()` recreates the
Chroma index from SQLite.

Retrieval: a user's fact ids come from SQLite; their vectors are fetched from Chroma by
id *and* `where={"user_id": uid}`, then ranked exactly with numpy. Per-user fact sets are
small, and an exact scan of them is faster than a filtered HNSW search over every user's
vectors (which Chroma answers slowly at 1% selectivity). Users with more than
`ann_min_facts` facts use Chroma's filtered ANN query instead. Either way, results are
re-checked against SQLite ownership before they are returned.

- `facts`: the fact store (SQLite): scoped reads, deduplicating writes, deletions.
- `index`: the vector index (Chroma): its client, recovery and rebuild.
- `service`: `MemoryService`, the facade the app and the CLIs use; ranking and rendering.
"""

from __future__ import annotations

from chatbot.memory.facts import MemoryFact, MemoryFactHistory, MemoryScopeError
from chatbot.memory.opener import recall_opener
from chatbot.memory.service import MemoryService, render_profile
from storage.memory_models import DEFAULT_COLLECTION

__all__ = [
    "DEFAULT_COLLECTION",
    "MemoryFact",
    "MemoryFactHistory",
    "MemoryScopeError",
    "MemoryService",
    "recall_opener",
    "render_profile",
]
