"""Rate limits and the sign-in throttle, kept in the database.

Every app process on one database shares them, and a restart forgets nothing: a limit
reached on one replica holds on the others. Keys (`user:<id>`, `addr:<ip>`, `name:<name>`)
are stored as their sha256 (`storage.models.limit_key`). Times are Unix seconds, since
processes share no monotonic clock.

Each check locks its keys' rows first (an UPDATE: a row lock on PostgreSQL, the write lock
on SQLite), so two processes counting the same key take turns instead of both slipping
under the limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from storage import Database
from storage.models import LoginFailureRow, RateWindowRow, limit_key

__all__ = ["LimitReached", "LoginThrottle", "SlidingWindows", "WindowLimit"]

log = logging.getLogger(__name__)

_ATTEMPTS = 5  # a concurrent first insert of a key, or a deadlock PostgreSQL broke
_PRUNE_EVERY_S = 60.0
_PRUNE_BATCH = 500
_FORGET_FAILURES_S = 86_400.0  # a key idle this long (or the longest wait) starts afresh
T = TypeVar("T")


def _retrying(db: Database, work: Callable[[Session], T]) -> T:
    for attempt in range(_ATTEMPTS):
        try:
            with db.session() as s:
                return work(s)
        except (IntegrityError, OperationalError) as exc:
            if attempt + 1 == _ATTEMPTS:
                raise
            log.debug("limit update raced (%s); retrying", type(exc).__name__)
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class WindowLimit:
    """At most `count` hits of `key` per `window_s` seconds (`count` 0: no limit)."""

    key: str
    count: int
    window_s: float = 60.0
    what: str = ""


class LimitReached(Exception):
    def __init__(self, limit: WindowLimit, wait_s: float):
        super().__init__(f"{limit.what or limit.key}: limit of {limit.count} reached")
        self.limit = limit
        self.wait_s = wait_s


class SlidingWindows:
    """Hits per key in a sliding window, shared by every process on the database."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time):
        self.db = db
        self.clock = clock
        self._next_prune = 0.0

    def take(self, limits: Sequence[WindowLimit]) -> None:
        """Count one hit against every limit, or raise LimitReached and count nothing."""
        active = sorted((lim for lim in limits if lim.count > 0), key=lambda lim: lim.key)
        if not active:
            return

        def work(s: Session) -> None:
            rows = [(lim, self._locked(s, lim.key, self.clock())) for lim in active]
            # Read the clock once the rows are ours: a hit another process recorded while
            # this one waited for the lock must not lie in its future.
            now = self.clock()
            for lim, row in rows:
                hits = [t for t in row.hits or [] if now - t < lim.window_s]
                if len(hits) >= lim.count:
                    raise LimitReached(lim, max(0.0, hits[0] + lim.window_s - now))
            for lim, row in rows:
                hits = [t for t in row.hits or [] if now - t < lim.window_s]
                row.hits = [*hits, now]
                row.expires_at = now + lim.window_s

        _retrying(self.db, work)
        self._maybe_prune()

    def add(self, key: str, window_s: float) -> None:
        """Count a hit with no limit (failures, checked later with `count`)."""
        self.take([WindowLimit(key, 1 << 30, window_s)])

    def count(self, key: str, window_s: float) -> int:
        now = self.clock()
        with self.db.session() as s:
            hits = s.scalar(select(RateWindowRow.hits).where(RateWindowRow.key == limit_key(key)))
        return sum(1 for t in hits or [] if now - t < window_s)

    def forget(self, key: str) -> None:
        with self.db.session() as s:
            s.execute(delete(RateWindowRow).where(RateWindowRow.key == limit_key(key)))

    @staticmethod
    def _locked(s: Session, key: str, now: float) -> RateWindowRow:
        """The key's row, locked for this transaction (made if new)."""
        stored = limit_key(key)
        touched = s.execute(
            update(RateWindowRow)
            .where(RateWindowRow.key == stored)
            .values(expires_at=RateWindowRow.expires_at)
        ).rowcount
        if not touched:
            s.add(RateWindowRow(key=stored, hits=[], expires_at=now))
            s.flush()  # a concurrent insert of the same key fails here; the caller retries
        row = s.get(RateWindowRow, stored, populate_existing=True)
        assert row is not None
        return row

    def _maybe_prune(self) -> None:
        """Drop expired rows, at most once a minute per process; rows another transaction
        holds are skipped (no waiting, so no deadlock with a concurrent `take`)."""
        now = self.clock()
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_EVERY_S
        expired = (
            select(RateWindowRow.key)
            .where(RateWindowRow.expires_at < now)
            .limit(_PRUNE_BATCH)
            .with_for_update(skip_locked=True)
        )
        try:
            with self.db.session() as s:
                s.execute(delete(RateWindowRow).where(RateWindowRow.key.in_(expired)))
        except OperationalError as exc:
            log.info("pruning expired rate windows failed (retried later): %s", exc.orig)


class LoginThrottle:
    """Failures per key; past `free` of them, the next attempt waits `base_s * 2**extra`."""

    def __init__(
        self,
        db: Database,
        free: int,
        base_s: float,
        max_s: float,
        clock: Callable[[], float] = time.time,
    ):
        self.db = db
        self.free = free
        self.base_s = base_s
        self.max_s = max_s
        self.clock = clock
        self._next_prune = 0.0

    def _delay(self, count: int) -> float:
        extra = count - self.free
        return 0.0 if extra < 0 else min(self.max_s, self.base_s * 2**extra)

    def wait_s(self, key: str) -> float:
        """Seconds before `key` may try again (0: now)."""
        with self.db.session() as s:
            row = s.get(LoginFailureRow, limit_key(key))
            if row is None:
                return 0.0
            return max(0.0, row.last_at + self._delay(row.count) - self.clock())

    def fail(self, key: str) -> None:
        stored = limit_key(key)

        def work(s: Session) -> None:
            now = self.clock()
            counted = s.execute(
                update(LoginFailureRow)
                .where(LoginFailureRow.key == stored)
                .values(count=LoginFailureRow.count + 1, last_at=now)
            ).rowcount
            if not counted:
                s.add(LoginFailureRow(key=stored, count=1, last_at=now))
                s.flush()

        _retrying(self.db, work)
        self._maybe_prune()

    def succeed(self, key: str) -> None:
        with self.db.session() as s:
            s.execute(delete(LoginFailureRow).where(LoginFailureRow.key == limit_key(key)))

    def _maybe_prune(self) -> None:
        now = self.clock()
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_EVERY_S
        idle = (
            select(LoginFailureRow.key)
            .where(LoginFailureRow.last_at < now - max(self.max_s, _FORGET_FAILURES_S))
            .limit(_PRUNE_BATCH)
            .with_for_update(skip_locked=True)
        )
        try:
            with self.db.session() as s:
                s.execute(delete(LoginFailureRow).where(LoginFailureRow.key.in_(idle)))
        except OperationalError as exc:
            log.info("pruning old sign-in failures failed (retried later): %s", exc.orig)
