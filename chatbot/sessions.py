"""Sign-in sessions kept in the database, so every replica and every restart honours them.

Gradio keeps its session table (cookie token -> user name) in process memory and names the
cookie after a random id made at start-up; either would sign users out on a restart or on
another replica. `SessionTokens` takes the table's place, and the cookie name comes from the
database (`cookie_id`), the same for every process on it.

Only the sha256 of a token is stored. A session is bound to the user id and the account
generation it signed in as: erasure (the user row goes) and a password change (the
generation moves on, and `Accounts.change_password` deletes the rows) end it everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from storage import Database
from storage.models import SiteValueRow, User, WebSessionRow, utcnow

__all__ = ["SessionTokens", "cookie_id", "token_hash"]

log = logging.getLogger(__name__)

_COOKIE_ID = "session_cookie_id"


def token_hash(token: str) -> str:
    # Tokens are 128+ random bits: a fast hash already makes the stored value useless.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def cookie_id(db: Database) -> str:
    """The suffix of the session cookie's name: made once, then read by every process."""
    with db.session() as s:
        row = s.get(SiteValueRow, _COOKIE_ID)
        if row is not None:
            return row.value
    try:
        with db.session() as s:
            s.add(SiteValueRow(name=_COOKIE_ID, value=secrets.token_urlsafe(16)))
    except IntegrityError:
        log.debug("another process made the session cookie id first")
    with db.session() as s:
        value = s.scalar(select(SiteValueRow.value).where(SiteValueRow.name == _COOKIE_ID))
    if value is None:
        raise RuntimeError("the session cookie id could not be stored")
    return value


class SessionTokens:
    """Gradio's token -> user name table, in the database.

    Gradio calls `table[token] = name` at sign-in and `table.get(token)` on every request.
    Its own /logout walks the table by user, which a table of hashes cannot do; the server
    answers /logout itself (`revoke`).
    """

    def __init__(self, db: Database, max_age_h: float):
        self.db = db
        self.max_age = timedelta(hours=max_age_h)

    def __setitem__(self, token: str, username: str) -> None:
        with self.db.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is None:
                return  # nobody to bind to: the session would name no one
            s.add(
                WebSessionRow(
                    token_hash=token_hash(token), user_id=user.id, generation=user.generation or 0
                )
            )
            s.execute(
                delete(WebSessionRow).where(WebSessionRow.created_at < utcnow() - self.max_age)
            )

    def get(self, token: object, default: str | None = None) -> str | None:
        if not isinstance(token, str) or not token:
            return default
        key = token_hash(token)
        with self.db.session() as s:
            found = s.execute(
                select(WebSessionRow, User)
                .outerjoin(User, User.id == WebSessionRow.user_id)
                .where(WebSessionRow.token_hash == key)
            ).first()
            if found is None:
                return default
            session, user = found
            fresh = session.created_at >= utcnow() - self.max_age
            if user is None or (user.generation or 0) != session.generation or not fresh:
                s.delete(session)
                return default
            return user.username

    def __getitem__(self, token: str) -> str:
        name = self.get(token)
        if name is None:
            raise KeyError("no such session")
        return name

    def __contains__(self, token: object) -> bool:
        return self.get(token) is not None

    def __delitem__(self, token: str) -> None:
        self.revoke(token, everywhere=False)

    def keys(self) -> list[str]:
        return []  # tokens are not kept in clear

    def revoke(self, token: str, *, everywhere: bool) -> int:
        """End this session, or (`everywhere`) every session of its user; returns how many."""
        key = token_hash(token)
        with self.db.session() as s:
            if not everywhere:
                return s.execute(
                    delete(WebSessionRow).where(WebSessionRow.token_hash == key)
                ).rowcount
            user_id = s.scalar(select(WebSessionRow.user_id).where(WebSessionRow.token_hash == key))
            if user_id is None:
                return 0
            return s.execute(delete(WebSessionRow).where(WebSessionRow.user_id == user_id)).rowcount
