"""Password sign-in: the check Gradio's /login calls, throttled, and sessions bound to accounts.

- `SignIn.check` is a coroutine, so Gradio awaits it; bcrypt runs in a thread pool behind a
  small semaphore, so the event loop (and /healthz) stays responsive under a flood of logins.
- `LoginThrottle` counts failures per account name and per client address; past a few free
  ones, each further attempt must wait, the wait doubling with every failure. A throttled
  attempt is answered 429 with Retry-After and never reaches bcrypt.
- `SessionTokens` replaces Gradio's in-memory table of session token -> user name. A token
  remembers the user id and account generation it signed in as; once that user is erased
  or changes password, the token no longer names anyone.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException

from chatbot.accounts import MAX_PASSWORD_BYTES, AccountError, Accounts
from core.settings import AuthSettings

__all__ = ["CLIENT_ADDRESS", "LoginThrottle", "SessionTokens", "SignIn", "client_address"]

log = logging.getLogger(__name__)

# The caller's address, set by the server's request guard for the request being handled.
CLIENT_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar(
    "upc_client_address", default="unknown"
)
_HASH_SLOTS = 4  # bcrypt checks at once; more wait their turn instead of starving the CPU
_MAX_TRACKED = 50_000


def client_address(request: object) -> str:
    """The address of a Gradio event's caller (behind a trusted proxy, the forwarded one)."""
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "")


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


class LoginThrottle:
    """Failures per key; past `free` of them, the next attempt waits `base_s * 2**extra`."""

    def __init__(
        self,
        free: int,
        base_s: float,
        max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.free = free
        self.base_s = base_s
        self.max_s = max_s
        self.clock = clock
        self._failures: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def _delay(self, failures: _Failures) -> float:
        extra = failures.count - self.free
        return 0.0 if extra < 0 else min(self.max_s, self.base_s * 2**extra)

    def wait_s(self, key: str) -> float:
        """Seconds before `key` may try again (0: now)."""
        with self._lock:
            failures = self._failures.get(key)
            if failures is None:
                return 0.0
            return max(0.0, failures.last + self._delay(failures) - self.clock())

    def fail(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            if len(self._failures) >= _MAX_TRACKED:
                self._forget_idle(now)
            failures = self._failures.setdefault(key, _Failures())
            failures.count += 1
            failures.last = now

    def succeed(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _forget_idle(self, now: float) -> None:
        """Bound the table: drop keys idle past the longest wait, else the older half."""
        idle = [k for k, f in self._failures.items() if now - f.last > self.max_s]
        if not idle:
            by_age = sorted(self._failures, key=lambda k: self._failures[k].last)
            idle = by_age[: len(by_age) // 2]
        for key in idle:
            del self._failures[key]


class SignIn:
    """The `auth` callable handed to Gradio in password mode."""

    def __init__(self, accounts: Accounts, auth: AuthSettings):
        self.accounts = accounts
        self.allow_signup = auth.allow_signup
        self.per_account = LoginThrottle(
            auth.login_free_failures, auth.login_backoff_s, auth.login_backoff_max_s
        )
        self.per_address = LoginThrottle(
            auth.login_ip_free_failures, auth.login_backoff_s, auth.login_backoff_max_s
        )
        self._slots = asyncio.Semaphore(_HASH_SLOTS)

    async def check(self, username: str, password: str) -> bool:
        address = CLIENT_ADDRESS.get()
        keys = (f"name:{username.lower()}", f"addr:{address}")
        wait = max(self.per_account.wait_s(keys[0]), self.per_address.wait_s(keys[1]))
        if wait > 0:
            log.warning("sign-in throttled for %r from %s (%.0f s)", username, address, wait)
            raise HTTPException(
                429,
                detail=f"Too many failed sign-ins; try again in {int(wait) + 1} s.",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        async with self._slots:
            ok = await asyncio.to_thread(self._check_or_register, username, password)
        if ok:
            self.per_account.succeed(keys[0])
            return True
        self.per_account.fail(keys[0])
        self.per_address.fail(keys[1])
        return False

    def _check_or_register(self, username: str, password: str) -> bool:
        if self.accounts.verify(username, password) is not None:
            return True
        if not self.allow_signup or self.accounts.by_name(username) is not None:
            return False
        # First sign-in with a new name registers it (the login page has no sign-up form).
        if len((password or "").encode("utf-8")) > MAX_PASSWORD_BYTES:
            raise HTTPException(
                400, detail=f"Passwords may be at most {MAX_PASSWORD_BYTES} bytes (UTF-8)."
            )
        try:
            self.accounts.register(username, password)
        except AccountError as exc:
            log.info("sign-up refused for %r: %s", username, exc)
            return False
        return True


class SessionTokens(dict[str, str]):
    """Gradio's token -> user name table, each token bound to a user id and generation.

    Gradio asks `get(token)` on every request; a token whose account was erased (the id is
    gone, even if the name was registered again) or whose password changed answers None.
    """

    def __init__(self, accounts: Accounts):
        super().__init__()
        self._accounts = accounts
        self._bound: dict[str, tuple[str, int]] = {}

    def __setitem__(self, token: str, username: str) -> None:
        user = self._accounts.by_name(username)
        if user is None:
            return  # nobody to bind to: the session would name no one
        self._bound[token] = (user.id, user.generation)
        super().__setitem__(token, username)

    def __delitem__(self, token: str) -> None:
        self._bound.pop(token, None)
        super().__delitem__(token)

    def get(self, token: object, default: str | None = None) -> str | None:  # type: ignore[override]
        if not isinstance(token, str) or not super().__contains__(token):
            return default
        user_id, generation = self._bound[token]
        if not self._accounts.session_valid(user_id, generation):
            self.pop(token, None)
            self._bound.pop(token, None)
            return default
        return super().__getitem__(token)
