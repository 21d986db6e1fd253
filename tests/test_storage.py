import sqlite3
import threading

import pytest
from sqlalchemy import text

from core.settings import load_settings, masked_dict
from storage import Database, DataDirError
from storage.db import normalise_url
from storage.migrations import MIGRATIONS


def _db(data_dir):
    return Database(f"sqlite:///{data_dir}/upc.db", data_dir=data_dir)


def test_fresh_sqlite_dir_is_initialised_with_wal_and_secure_delete(data_dir):
    db = _db(data_dir)
    with db.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
    assert (data_dir / ".upc-data.json").exists()
    db.dispose()


def test_fresh_database_gets_every_migration_once(db_url, data_dir):
    db = Database(db_url, data_dir=data_dir)
    assert db.dialect in ("sqlite", "postgresql") and db.dialect in db_url
    with db.engine.connect() as con:
        applied = [r[0] for r in con.execute(text("SELECT id FROM schema_migrations"))]
    assert sorted(applied) == sorted(m.id for m in MIGRATIONS)
    db.dispose()
    # Re-opening applies nothing twice and keeps data.
    db2 = Database(db_url, data_dir=data_dir)
    with db2.engine.connect() as con:
        assert con.execute(text("SELECT count(*) FROM schema_migrations")).scalar() == len(
            MIGRATIONS
        )
    db2.dispose()


def test_upgrade_from_older_schema_keeps_rows(db_url, data_dir):
    db = Database(db_url, data_dir=data_dir)
    with db.engine.begin() as con:
        con.execute(
            text(
                "INSERT INTO users (id, username, is_admin, anonymous, memory_enabled, "
                "learning_opt_in, excluded_from_training, created_at) "
                "VALUES ('u1', 'keep-me', false, false, true, true, false, '2026-01-01')"
            )
        )
        # Pretend the newest migrations never ran, as on an older install.
        con.execute(text("DELETE FROM schema_migrations WHERE id != '0001_core'"))
    db.dispose()
    db2 = Database(db_url, data_dir=data_dir)
    with db2.engine.connect() as con:
        assert con.execute(text("SELECT username FROM users")).scalar() == "keep-me"
        assert con.execute(text("SELECT count(*) FROM schema_migrations")).scalar() == len(
            MIGRATIONS
        )
    db2.dispose()


def test_replicas_starting_together_migrate_once(postgres, data_dir):
    url = postgres.create_database()
    errors: list[BaseException] = []
    opened: list[Database] = []

    def start() -> None:
        try:
            opened.append(Database(url, data_dir=data_dir))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 4
    with opened[0].engine.connect() as con:
        ids = [r[0] for r in con.execute(text("SELECT id FROM schema_migrations"))]
    assert sorted(ids) == sorted(m.id for m in MIGRATIONS)
    for db in opened:
        db.dispose()
    postgres.drop_database(url)


def test_database_url_setting_names_the_database_and_hides_its_password(tmp_path):
    default = load_settings(env={"UPC_DATA_DIR": str(tmp_path)})
    assert default.db_url == f"sqlite:///{tmp_path / 'upc.db'}"
    url = "postgresql://upc:s3cret@db.internal:5432/upc"
    settings = load_settings(env={"UPC_DATA_DIR": str(tmp_path), "UPC_DATABASE_URL": url})
    assert settings.db_url == url
    shown = masked_dict(settings)["database_url"]
    assert "s3cret" not in shown and shown == "postgresql://upc:***@db.internal:5432/upc"
    assert normalise_url(url).startswith("postgresql+psycopg://upc:s3cret@")
    assert normalise_url("postgres://h/d") == "postgresql+psycopg://h/d"
    assert normalise_url("postgresql+psycopg2://h/d") == "postgresql+psycopg2://h/d"


def test_bad_database_url_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="SQLAlchemy URL"):
        load_settings(env={"UPC_DATABASE_URL": "upc.db"})
    with pytest.raises(DataDirError, match="database URL is not valid"):
        Database("nonsense://::", data_dir=tmp_path)
    with pytest.raises(DataDirError, match="not usable"):
        Database("nosuchdb://h/d", data_dir=tmp_path)


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
