"""Versioned schema: an ordered list of migrations, each applied once and recorded.

Add a new `Migration` at the end of `MIGRATIONS`; never edit or reorder applied ones.
A migration either creates whole tables of an ORM module or runs a function.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import Engine

__all__ = ["MIGRATIONS", "Migration", "applied_migrations", "apply_migrations"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    id: str
    # "module:Table" names of ORM tables to create, e.g. "storage.models:users".
    tables: tuple[str, ...] = ()
    run: Callable[[Connection], None] | None = field(default=None, compare=False)


def _add_turn_attempt_columns(conn: Connection) -> None:
    """Turns record every attempt and the final reply's finish reason (older DBs lack both)."""
    have = {c["name"] for c in inspect(conn).get_columns("learn_turns")}
    if "attempts" not in have:
        conn.execute(text("ALTER TABLE learn_turns ADD COLUMN attempts JSON"))
    if "final_finish_reason" not in have:
        conn.execute(
            text("ALTER TABLE learn_turns ADD COLUMN final_finish_reason VARCHAR(16) DEFAULT ''")
        )


MIGRATIONS: list[Migration] = [
    Migration(
        "0001_core",
        tables=(
            "storage.models:users",
            "storage.models:conversations",
            "storage.models:messages",
            "storage.models:feedback",
        ),
    ),
    Migration(
        "0005_adapters",
        tables=(
            "storage.adapter_models:adapters",
            "storage.adapter_models:adapter_activations",
            "storage.adapter_models:training_runs",
            "storage.adapter_models:gate_evaluations",
        ),
    ),
    Migration("0006_memory", tables=("storage.memory_models:memory_facts",)),
    Migration(
        "0004_learner_corpus",
        tables=(
            "storage.learner_models:learn_runs",
            "storage.learner_models:learn_dialogues",
            "storage.learner_models:learn_turns",
            "storage.learner_models:learn_curriculum",
        ),
    ),
    Migration(
        "0007_learning_loop",
        tables=(
            "storage.learning_models:scheduler_lease",
            "storage.learning_models:job_runs",
            "storage.learning_models:job_progress",
            "storage.learning_models:job_controls",
            "storage.learning_models:logged_turns",
            "storage.learning_models:guard_exclusions",
            "storage.learning_models:erasures",
        ),
    ),
    Migration("0008_turn_attempts", run=_add_turn_attempt_columns),
]


def _create_tables(conn: Connection, names: tuple[str, ...]) -> None:
    for name in names:
        module_name, table_name = name.split(":")
        module = importlib.import_module(module_name)
        table = module.Base.metadata.tables[table_name]
        table.create(conn, checkfirst=True)


def applied_migrations(conn: Connection) -> list[str]:
    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(id VARCHAR(100) PRIMARY KEY, applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
        )
    )
    return [row[0] for row in conn.execute(text("SELECT id FROM schema_migrations ORDER BY id"))]


def apply_migrations(engine: Engine) -> list[str]:
    """Apply every pending migration in order, each in its own transaction."""
    with engine.begin() as conn:
        done = set(applied_migrations(conn))
    newly: list[str] = []
    for migration in MIGRATIONS:
        if migration.id in done:
            continue
        with engine.begin() as conn:
            _create_tables(conn, migration.tables)
            if migration.run is not None:
                migration.run(conn)
            conn.execute(
                text("INSERT INTO schema_migrations (id) VALUES (:id)"), {"id": migration.id}
            )
        log.info("applied schema migration %s", migration.id)
        newly.append(migration.id)
    return newly
