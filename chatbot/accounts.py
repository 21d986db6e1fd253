"""User accounts: password users (bcrypt) and anonymous per-browser users.

Security rules kept here:
- A name listed as an admin can't be claimed by sign-up (`register`); admins come from
  `upc users add --admin` or from the admin password in the environment at first start.
- Every account has a generation; a password change bumps it, and sessions bound to an
  older generation (or to a deleted user id) are void (`session_valid`).
- An anonymous browser holds a server-issued secret; only its sha256 is stored, and the
  user's name is derived from the row id, so no page ever shows the secret.
- bcrypt's 72-byte limit is a clear error at sign-up; sign-in with any length costs the
  same as a real check, as does sign-in with an unknown name.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from dataclasses import dataclass

import bcrypt
from sqlalchemy import delete, select

from storage import Database
from storage.models import User, WebSessionRow, new_id

__all__ = ["MAX_PASSWORD_BYTES", "AccountError", "Accounts", "UserRecord"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{2,64}$")
_MIN_PASSWORD = 8
MAX_PASSWORD_BYTES = 72  # bcrypt ignores (bcrypt>=5: refuses) anything longer
_ANON_PREFIX = "anon-"
_TOKEN_MIN, _TOKEN_MAX = 16, 128


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
    generation: int = 0

    @classmethod
    def of(cls, user: User) -> UserRecord:
        return cls(
            id=user.id,
            username=user.username,
            is_admin=user.is_admin,
            anonymous=user.anonymous,
            memory_enabled=user.memory_enabled,
            learning_opt_in=user.learning_opt_in,
            generation=user.generation or 0,
        )


def _token_hash(token: str) -> str:
    # The token is 192 random bits, so a fast hash is enough to make the stored value useless.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_password(password: str) -> bytes:
    if len(password or "") < _MIN_PASSWORD:
        raise AccountError(f"Passwords need at least {_MIN_PASSWORD} characters.")
    raw = password.encode("utf-8")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise AccountError(
            f"Passwords may be at most {MAX_PASSWORD_BYTES} bytes (UTF-8); choose a shorter one."
        )
    return raw


class Accounts:
    def __init__(self, db: Database, *, admin_names: frozenset[str] = frozenset()):
        self.db = db
        self.admin_names = admin_names
        self._dummy: bytes | None = None
        self._dummy_lock = threading.Lock()

    # ------------------------------------------------------------ password users
    def create(self, username: str, password: str, *, is_admin: bool = False) -> UserRecord:
        """An account made by the operator (`upc users add`); `is_admin` as asked."""
        if not _NAME_RE.match(username or "") or username.startswith(_ANON_PREFIX):
            raise AccountError(
                "User names are 2-64 letters, digits or . _ @ - and may not start with 'anon-'."
            )
        digest = bcrypt.hashpw(_check_password(password), bcrypt.gensalt()).decode("ascii")
        with self.db.session() as s:
            if s.scalar(select(User).where(User.username == username)) is not None:
                raise AccountError(f"The user name {username!r} is taken.")
            user = User(username=username, password_hash=digest, is_admin=is_admin)
            s.add(user)
            s.flush()
            return UserRecord.of(user)

    def register(self, username: str, password: str) -> UserRecord:
        """Self sign-up: never an admin, and never one of the names reserved for admins."""
        if username in self.admin_names:
            raise AccountError(f"The user name {username!r} is reserved.")
        return self.create(username, password)

    def ensure_admins(self, password: str | None) -> list[str]:
        """Create each listed admin that has no account yet, with `password` (first start)."""
        if not password:
            return []
        made = []
        for name in sorted(self.admin_names):
            if self.by_name(name) is None:
                self.create(name, password, is_admin=True)
                made.append(name)
        return made

    def verify(self, username: str, password: str) -> UserRecord | None:
        raw = (password or "").encode("utf-8")
        with self.db.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is None or not user.password_hash or len(raw) > MAX_PASSWORD_BYTES:
                # Same cost as a real check, so names can't be probed by timing.
                bcrypt.checkpw(raw[:MAX_PASSWORD_BYTES], self._dummy_hash())
                return None
            if not bcrypt.checkpw(raw, user.password_hash.encode("ascii")):
                return None
            if username in self.admin_names and not user.is_admin:
                user.is_admin = True
            return UserRecord.of(user)

    def change_password(self, username: str, password: str) -> UserRecord:
        """Set a new password; every session of the account ends (its generation moves on)."""
        digest = bcrypt.hashpw(_check_password(password), bcrypt.gensalt()).decode("ascii")
        with self.db.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is None or user.anonymous:
                raise AccountError(f"no user {username!r}")
            user.password_hash = digest
            user.generation = (user.generation or 0) + 1
            s.execute(delete(WebSessionRow).where(WebSessionRow.user_id == user.id))
            return UserRecord.of(user)

    def session_valid(self, user_id: str, generation: int) -> bool:
        """A session signed in as (user id, generation) still stands."""
        with self.db.session() as s:
            user = s.get(User, user_id)
            return user is not None and (user.generation or 0) == generation

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

    # ------------------------------------------------------------ anonymous users
    def issue_anonymous(self) -> tuple[str, UserRecord]:
        """A new anonymous user and the secret its browser keeps (only its hash is stored)."""
        token = secrets.token_urlsafe(24)
        user_id = new_id()
        with self.db.session() as s:
            user = User(
                id=user_id,
                username=_ANON_PREFIX + user_id,
                anonymous=True,
                token_hash=_token_hash(token),
            )
            s.add(user)
            s.flush()
            return token, UserRecord.of(user)

    def anonymous(self, token: str) -> UserRecord:
        """The anonymous user whose browser holds `token`; unknown secrets are refused."""
        if not token or not _TOKEN_MIN <= len(token) <= _TOKEN_MAX:
            raise AccountError("missing or malformed browser id")
        with self.db.session() as s:
            user = s.scalar(select(User).where(User.token_hash == _token_hash(token)))
            if user is None:
                raise AccountError("unknown browser id")
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

    def _dummy_hash(self) -> bytes:
        # Made once with the default cost, the same as every real hash.
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt())
            return self._dummy
