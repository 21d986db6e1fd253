"""Engine, sessions and start-up checks of the data directory."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.migrations import apply_migrations

__all__ = ["DATA_DIR_MARKER", "DataDirError", "Database"]

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


class Database:
    """Owns the engine; `session()` yields a transaction that commits on success."""

    def __init__(self, url: str, *, data_dir: Path | None = None, secure_delete: bool = True):
        self.url = url
        if url.startswith("sqlite:///") and data_dir is not None:
            _prepare_data_dir(data_dir, Path(url.removeprefix("sqlite:///")))
        is_sqlite = url.startswith("sqlite")
        connect_args = {"check_same_thread": False, "timeout": 30} if is_sqlite else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
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

    def checkpoint(self) -> None:
        """Fold the WAL back into the main file (used after erasure)."""
        if self.url.startswith("sqlite"):
            with self.engine.connect() as con:
                con.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def ping(self) -> bool:
        with self.engine.connect() as con:
            return con.execute(text("SELECT 1")).scalar() == 1

    def dispose(self) -> None:
        self.engine.dispose()
