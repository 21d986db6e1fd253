"""Dialogue export for researchers: JSONL (OpenAI `messages`), ShareGPT, Parquet, HF `datasets`.

Real conversations come from the core tables; synthetic ones from the learner's corpus.
Every bot turn carries its adapter, critic scores and reasons, its regeneration history
(all versions, oldest first, the final reply last) and the user's feedback.

- `records`: the typed records, options and results (and the schema convention).
- `reader`: one keyset-paginated reader for both sources.
- `schema`, `writers`: the Arrow schemas and one writer per format.
- `paths`: export ids, manifests and the one safe download lookup.
- `run`: `export()`, the stage function.
"""

from __future__ import annotations

from learner.export.paths import list_exports, new_export_id, resolve_export_file
from learner.export.reader import hash_user_id
from learner.export.records import (
    FEEDBACK_CHOICES,
    FORMAT_FILES,
    FORMATS,
    SALT_ENV,
    SOURCES,
    BotAttempt,
    ConversationMeta,
    CriticScores,
    ExportCancelled,
    ExportError,
    ExportFilters,
    ExportOptions,
    ExportPathError,
    ExportProgress,
    ExportRecord,
    ExportResult,
    TurnMeta,
)
from learner.export.run import export
from learner.export.schema import CONVERSATION_SCHEMA, MESSAGE_SCHEMA
from learner.export.writers import _HfDatasetWriter as _HfDatasetWriter

__all__ = [
    "CONVERSATION_SCHEMA",
    "FEEDBACK_CHOICES",
    "FORMATS",
    "FORMAT_FILES",
    "MESSAGE_SCHEMA",
    "SALT_ENV",
    "SOURCES",
    "BotAttempt",
    "ConversationMeta",
    "CriticScores",
    "ExportCancelled",
    "ExportError",
    "ExportFilters",
    "ExportOptions",
    "ExportPathError",
    "ExportProgress",
    "ExportRecord",
    "ExportResult",
    "TurnMeta",
    "export",
    "hash_user_id",
    "list_exports",
    "new_export_id",
    "resolve_export_file",
]
