import sqlite3

import pytest
from sqlalchemy import text

from storage import Database, DataDirError
from storage.migrations import MIGRATIONS


def _db(data_dir):
    return Database(f"sqlite:///{data_dir}/upc.db", data_dir=data_dir)


def test_fresh_dir_is_initialised_with_wal_and_all_migrations(data_dir):
    db = _db(data_dir)
    with db.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
        applied = [r[0] for r in con.execute(text("SELECT id FROM schema_migrations"))]
    assert sorted(applied) == sorted(m.id for m in MIGRATIONS)
    db.dispose()
    # Re-opening applies nothing twice and keeps data.
    db2 = _db(data_dir)
    with db2.engine.connect() as con:
        assert con.execute(text("SELECT count(*) FROM schema_migrations")).scalar() == len(
            MIGRATIONS
        )


def test_upgrade_from_older_schema_keeps_rows(data_dir):
    db = _db(data_dir)
    with db.engine.begin() as con:
        con.execute(
            text(
                "INSERT INTO users (id, username, is_admin, anonymous, memory_enabled, learning_opt_in, excluded_from_training, created_at) VALUES ('u1','keep-me',0,0,1,1,0,'2026-01-01')"
            )
        )
        # Pretend the newest migrations never ran, as on an older install.
        con.execute(text("DELETE FROM schema_migrations WHERE id != '0001_core'"))
    db.dispose()
    db2 = _db(data_dir)
    with db2.engine.connect() as con:
        assert con.execute(text("SELECT username FROM users")).scalar() == "keep-me"
        assert con.execute(text("SELECT count(*) FROM schema_migrations")).scalar() == len(
            MIGRATIONS
        )


def test_corrupt_database_refuses_to_start_and_is_left_untouched(data_dir):
    _db(data_dir).dispose()
    db_file = data_dir / "upc.db"
    for suffix in ("-wal", "-shm"):
        (data_dir / f"upc.db{suffix}").unlink(missing_ok=True)
    db_file.write_bytes(b"this is not sqlite at all" * 100)
    before = db_file.read_bytes()
    with pytest.raises(DataDirError, match="not a SQLite database"):
        _db(data_dir)
    assert db_file.read_bytes() == before


def test_missing_database_in_known_data_dir_is_an_error_not_a_reset(data_dir):
    _db(data_dir).dispose()
    for name in ("upc.db", "upc.db-wal", "upc.db-shm"):
        (data_dir / name).unlink(missing_ok=True)
    with pytest.raises(DataDirError, match="missing"):
        _db(data_dir)
    assert not (data_dir / "upc.db").exists()


def test_data_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataDirError, match="not a directory"):
        Database(f"sqlite:///{f}/upc.db", data_dir=f)


def test_truncated_sqlite_file_is_detected(data_dir):
    db = _db(data_dir)
    db.checkpoint()
    db.dispose()
    path = data_dir / "upc.db"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3] + b"\xff" * 4096)
    with pytest.raises((DataDirError, sqlite3.DatabaseError)):
        _db(data_dir)
