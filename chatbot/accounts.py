"""User accounts: password users (bcrypt) and anonymous per-browser users."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import bcrypt
from sqlalchemy import select

from storage import Database
from storage.models import User

__all__ = ["AccountError", "Accounts", "UserRecord"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{2,64}$")
_MIN_PASSWORD = 8
_ANON_PREFIX = "anon-"


class AccountError(ValueError):
    pass


@dataclass(frozen=True)
class UserRecord:
    id: str
    username: str
    is_admin: bool
    anonymous: bool
    memory_enabled: bool
    learning_opt_in: bool

    @classmethod
    def of(cls, user: User) -> UserRecord:
        return cls(
            id=user.id,
            username=user.username,
            is_admin=user.is_admin,
            anonymous=user.anonymous,
            memory_enabled=user.memory_enabled,
            learning_opt_in=user.learning_opt_in,
        )


class Accounts:
    def __init__(self, db: Database, *, admin_names: frozenset[str] = frozenset()):
        self.db = db
        self.admin_names = admin_names

    def create(self, username: str, password: str, *, is_admin: bool = False) -> UserRecord:
        if not _NAME_RE.match(username or "") or username.startswith(_ANON_PREFIX):
            raise AccountError(
                "User names are 2-64 letters, digits or . _ @ - and may not start with 'anon-'."
            )
        if len(password or "") < _MIN_PASSWORD:
            raise AccountError(f"Passwords need at least {_MIN_PASSWORD} characters.")
        digest = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt()).decode("ascii")
        with self.db.session() as s:
            if s.scalar(select(User).where(User.username == username)) is not None:
                raise AccountError(f"The user name {username!r} is taken.")
            user = User(
                username=username,
                password_hash=digest,
                is_admin=is_admin or username in self.admin_names,
            )
            s.add(user)
            s.flush()
            return UserRecord.of(user)

    def verify(self, username: str, password: str) -> UserRecord | None:
        with self.db.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is None or not user.password_hash:
                # Spend the same time as a real check so names can't be probed by timing.
                bcrypt.checkpw(b"x", bcrypt.hashpw(b"y", bcrypt.gensalt(rounds=4)))
                return None
            if not bcrypt.checkpw(password.encode("utf-8"), user.password_hash.encode("ascii")):
                return None
            if username in self.admin_names and not user.is_admin:
                user.is_admin = True
            return UserRecord.of(user)

    def by_name(self, username: str) -> UserRecord | None:
        with self.db.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is not None and username in self.admin_names and not user.is_admin:
                user.is_admin = True
            return UserRecord.of(user) if user else None

    def by_id(self, user_id: str) -> UserRecord | None:
        with self.db.session() as s:
            user = s.get(User, user_id)
            return UserRecord.of(user) if user else None

    @staticmethod
    def new_browser_id() -> str:
        return secrets.token_urlsafe(24)

    def anonymous(self, browser_id: str) -> UserRecord:
        """The anonymous user owned by one browser (its id is a random secret it keeps)."""
        if not browser_id or len(browser_id) < 16 or len(browser_id) > 128:
            raise AccountError("missing or malformed browser id")
        name = _ANON_PREFIX + browser_id
        with self.db.session() as s:
            user = s.scalar(select(User).where(User.username == name))
            if user is None:
                user = User(username=name, anonymous=True)
                s.add(user)
                s.flush()
            return UserRecord.of(user)

    def set_preferences(
        self,
        user_id: str,
        *,
        memory_enabled: bool | None = None,
        learning_opt_in: bool | None = None,
    ) -> UserRecord:
        with self.db.session() as s:
            user = s.get(User, user_id)
            if user is None:
                raise AccountError("unknown user")
            if memory_enabled is not None:
                user.memory_enabled = memory_enabled
            if learning_opt_in is not None:
                user.learning_opt_in = learning_opt_in
            return UserRecord.of(user)
