"""Versioned schema: an ordered list of migrations, each applied once and recorded.

Add a new `Migration` at the end of `MIGRATIONS`; never edit or reorder applied ones.
A migration either creates whole tables (given by their ORM classes) or runs a function.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import Engine

from storage.adapter_models import AdapterActivation, AdapterRow, GateEvaluationRow, TrainingRun
from storage.corpus_models import CurriculumRow, DialogueRow, RunRow, TurnRow
from storage.job_models import JobControlRow, JobProgressRow, JobRunRow, SchedulerLeaseRow
from storage.logged_models import ErasureRow, GuardExclusionRow, LoggedTurnRow
from storage.memory_models import MemoryFactHistoryRow, MemoryFactRow
from storage.models import (
    Base,
    Conversation,
    Feedback,
    LoginFailureRow,
    Message,
    RateWindowRow,
    SiteValueRow,
    User,
    WebSessionRow,
)

__all__ = ["MIGRATIONS", "Migration", "applied_migrations", "apply_migrations"]

log = logging.getLogger(__name__)

# pg_advisory_lock's key for schema changes (any constant the app uses nowhere else).
_MIGRATION_LOCK = 0x55504301


@dataclass(frozen=True)
class Migration:
    id: str
    # ORM classes whose tables to create, e.g. `User`.
    tables: tuple[type[Base], ...] = ()
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


def _add_account_security_columns(conn: Connection) -> None:
    """Account generations (sessions die with a password change) and hashed anonymous secrets.

    Older databases named an anonymous user `anon-<browser secret>`, so anyone who could see
    a user name could take over the browser; the secret moves to a hash, the name to the id.
    """
    have = {c["name"] for c in inspect(conn).get_columns("users")}
    if "generation" not in have:
        conn.execute(text("ALTER TABLE users ADD COLUMN generation INTEGER NOT NULL DEFAULT 0"))
    if "token_hash" not in have:
        conn.execute(text("ALTER TABLE users ADD COLUMN token_hash VARCHAR(64)"))
        conn.execute(
            text("CREATE UNIQUE INDEX IF NOT EXISTS ix_users_token_hash ON users (token_hash)")
        )
    rows = conn.execute(
        text("SELECT id, username FROM users WHERE anonymous AND token_hash IS NULL")
    ).all()
    for user_id, username in rows:
        secret = username.removeprefix("anon-")
        conn.execute(
            text("UPDATE users SET token_hash = :h, username = :n WHERE id = :i"),
            {
                "h": hashlib.sha256(secret.encode()).hexdigest(),
                "n": f"anon-{user_id}",
                "i": user_id,
            },
        )


MIGRATIONS: list[Migration] = [
    Migration(
        "0001_core",
        tables=(
            User,
            Conversation,
            Message,
            Feedback,
        ),
    ),
    Migration(
        "0005_adapters",
        tables=(
            AdapterRow,
            AdapterActivation,
            TrainingRun,
            GateEvaluationRow,
        ),
    ),
    Migration("0006_memory", tables=(MemoryFactRow,)),
    Migration(
        "0004_learner_corpus",
        tables=(
            RunRow,
            DialogueRow,
            TurnRow,
            CurriculumRow,
        ),
    ),
    Migration(
        "0007_learning_loop",
        tables=(
            SchedulerLeaseRow,
            JobRunRow,
            JobProgressRow,
            JobControlRow,
            LoggedTurnRow,
            GuardExclusionRow,
            ErasureRow,
        ),
    ),
    Migration("0008_turn_attempts", run=_add_turn_attempt_columns),
    Migration("0009_account_security", run=_add_account_security_columns),
    Migration("0010_memory_history", tables=(MemoryFactHistoryRow,)),
    Migration(
        "0011_shared_sessions",
        tables=(WebSessionRow, LoginFailureRow, RateWindowRow, SiteValueRow),
    ),
]


def _create_tables(conn: Connection, tables: tuple[type[Base], ...]) -> None:
    for orm_class in tables:
        orm_class.__table__.create(conn, checkfirst=True)


def applied_migrations(conn: Connection) -> list[str]:
    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(id VARCHAR(100) PRIMARY KEY, applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
        )
    )
    return [row[0] for row in conn.execute(text("SELECT id FROM schema_migrations ORDER BY id"))]


@contextmanager
def _one_migrator(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, replicas starting together migrate one at a time (an advisory lock,
    held by its own connection); SQLite serialises writers by itself."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as lock:
        lock.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
        lock.commit()
        try:
            yield
        finally:
            lock.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
            lock.commit()


def apply_migrations(engine: Engine) -> list[str]:
    """Apply every pending migration in order, each in its own transaction."""
    with _one_migrator(engine):
        return _apply_pending(engine)


def _apply_pending(engine: Engine) -> list[str]:
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
