"""Persistence: SQLAlchemy 2.x on SQLite (WAL) by default, or PostgreSQL (psycopg 3)."""

from storage.db import Database, DataDirError
from storage.models import Base

__all__ = ["Base", "DataDirError", "Database"]
