"""Engine, sessions and start-up checks of the data directory.

SQLite (WAL, secure-delete) is the default; any other SQLAlchemy URL works, and
`postgresql://` URLs use psycopg 3. Dialect-specific work (pragmas, compaction after an
erasure) lives here, so the layers above stay dialect-free.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from storage.migrations import apply_migrations

__all__ = ["DATA_DIR_MARKER", "DataDirError", "Database", "normalise_url"]

log = logging.getLogger(__name__)

DATA_DIR_MARKER = ".upc-data.json"


class DataDirError(RuntimeError):
    """The data directory is unusable; we refuse to start rather than lose data."""


_CHECK_ATTEMPTS = 5


def _check_sqlite_file(db_path: Path) -> None:
    try:
        with db_path.open("rb") as fh:
            header = fh.read(16)
    except OSError as exc:
        raise DataDirError(f"cannot read database {db_path}: {exc}") from exc
    if header and header != b"SQLite format 3\x00":
        raise DataDirError(
            f"{db_path} is not a SQLite database (corrupt or overwritten). "
            "Restore it from a backup or move it away; nothing was changed."
        )
    result = None
    for attempt in range(_CHECK_ATTEMPTS):
        try:
            con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            try:
                result = con.execute("PRAGMA quick_check").fetchone()
            finally:
                con.close()
            break
        except sqlite3.OperationalError as exc:
            # Busy or mid-checkpoint (another process closing the WAL), not corruption.
            if attempt + 1 == _CHECK_ATTEMPTS:
                raise DataDirError(
                    f"cannot check database {db_path}: {exc}. Nothing was changed."
                ) from exc
            time.sleep(0.2 * (attempt + 1))
        except sqlite3.DatabaseError as exc:
            raise DataDirError(
                f"database {db_path} is corrupt: {exc}. Nothing was changed."
            ) from exc
    if result and result[0] != "ok":
        raise DataDirError(f"database {db_path} failed its integrity check: {result[0]}")


def _prepare_data_dir(data_dir: Path, db_path: Path) -> None:
    """Create a fresh data dir, or verify an existing one. Never re-initialise silently."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DataDirError(f"data dir {data_dir} exists but is not a directory")
    marker = data_dir / DATA_DIR_MARKER
    if marker.exists():
        if not db_path.exists():
            raise DataDirError(
                f"data dir {data_dir} was initialised before, but its database {db_path.name} "
                "is missing. Restore it, or point UPC_DATA_DIR at a new directory."
            )
        try:
            json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataDirError(f"data dir marker {marker} is corrupt: {exc}") from exc
        _check_sqlite_file(db_path)
        return
    if db_path.exists():
        _check_sqlite_file(db_path)
    data_dir.mkdir(parents=True, exist_ok=True)
    # The database file first, then the marker: a process starting beside this one never
    # sees a marked data dir without its database.
    sqlite3.connect(db_path).close()
    marker.write_text(json.dumps({"format": 1}), encoding="utf-8")


def normalise_url(url: str) -> str:
    """`postgresql://` and `postgres://` name psycopg 3, the PostgreSQL driver we install
    (SQLAlchemy's default for them is psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


class Database:
    """Owns the engine; `session()` yields a transaction that commits on success."""

    def __init__(self, url: str, *, data_dir: Path | None = None, secure_delete: bool = True):
        self.url = normalise_url(url)
        try:
            self.dialect = make_url(self.url).get_backend_name()
        except (ArgumentError, ValueError) as exc:
            raise DataDirError(f"the database URL is not valid: {exc}") from exc
        if self.url.startswith("sqlite:///") and data_dir is not None:
            _prepare_data_dir(data_dir, Path(self.url.removeprefix("sqlite:///")))
        elif data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
        is_sqlite = self.is_sqlite
        connect_args = {"check_same_thread": False, "timeout": 30} if is_sqlite else {}
        try:
            self.engine: Engine = create_engine(
                self.url, connect_args=connect_args, pool_pre_ping=True
            )
        except ArgumentError as exc:  # an unknown dialect or driver
            raise DataDirError(f"the database URL is not usable: {exc}") from exc
        if is_sqlite:

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_con, _record):  # type: ignore[no-untyped-def]
                cur = dbapi_con.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                if secure_delete:
                    cur.execute("PRAGMA secure_delete=ON")
                cur.close()

        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        apply_migrations(self.engine)

    @classmethod
    def from_settings(cls, settings) -> Database:  # type: ignore[no-untyped-def]
        return cls(settings.db_url, data_dir=settings.data_dir)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def checkpoint(self) -> None:
        """Fold the WAL back into the main file (used after erasure)."""
        if self.is_sqlite:
            with self.engine.connect() as con:
                con.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def compact(self, tables: Sequence[str]) -> None:
        """Leave no deleted row's bytes in the database files (after an erasure).

        SQLite: secure-delete zeroed the freed cells; fold the WAL, VACUUM, truncate the
        WAL. PostgreSQL: a plain VACUUM only marks dead tuples reusable, so the touched
        tables (and their indexes and TOAST) are rewritten by VACUUM FULL, which cannot run
        in a transaction and locks each table while it runs.
        """
        if self.is_sqlite:
            self.checkpoint()
            with self.engine.connect() as con:
                con.exec_driver_sql("VACUUM")
            self.checkpoint()
            return
        if self.dialect != "postgresql":
            log.warning("no compaction for %s: deleted rows may linger on disk", self.dialect)
            return
        quote = self.engine.dialect.identifier_preparer.quote
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as con:
            for table in tables:
                con.exec_driver_sql(f"VACUUM (FULL) {quote(table)}")

    def ping(self) -> bool:
        with self.engine.connect() as con:
            return con.execute(text("SELECT 1")).scalar() == 1

    def dispose(self) -> None:
        self.engine.dispose()
