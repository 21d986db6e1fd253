"""Password sign-in: the check Gradio's /login calls, throttled, and sessions bound to accounts.

- `SignIn.check` is a coroutine, so Gradio awaits it; bcrypt runs in a thread pool behind a
  small semaphore, so the event loop (and /healthz) stays responsive under a flood of logins.
- Failures are counted per account name and per client address (`LoginThrottle`, in the
  database, so every replica sees them); past a few free ones, each further attempt must
  wait, the wait doubling with every failure. A throttled attempt is answered 429 with
  Retry-After and never reaches bcrypt.
- The sessions it opens live in the database too (`chatbot.sessions`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from fastapi import HTTPException

from chatbot.accounts import MAX_PASSWORD_BYTES, AccountError, Accounts
from chatbot.limits import LoginThrottle
from core.settings import AuthSettings

__all__ = ["CLIENT_ADDRESS", "SignIn", "client_address"]

log = logging.getLogger(__name__)

# The caller's address, set by the server's request guard for the request being handled.
CLIENT_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar(
    "upc_client_address", default="unknown"
)
_HASH_SLOTS = 4  # bcrypt checks at once; more wait their turn instead of starving the CPU


def client_address(request: object) -> str:
    """The address of a Gradio event's caller (behind a trusted proxy, the forwarded one)."""
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "")


class SignIn:
    """The `auth` callable handed to Gradio in password mode."""

    def __init__(self, accounts: Accounts, auth: AuthSettings):
        self.accounts = accounts
        self.allow_signup = auth.allow_signup
        db = accounts.db
        self.per_account = LoginThrottle(
            db, auth.login_free_failures, auth.login_backoff_s, auth.login_backoff_max_s
        )
        self.per_address = LoginThrottle(
            db, auth.login_ip_free_failures, auth.login_backoff_s, auth.login_backoff_max_s
        )
        self._slots = asyncio.Semaphore(_HASH_SLOTS)

    async def check(self, username: str, password: str) -> bool:
        address = CLIENT_ADDRESS.get()
        keys = (f"name:{username.lower()}", f"addr:{address}")
        wait = await asyncio.to_thread(self._wait_s, keys)
        if wait > 0:
            log.warning("sign-in throttled for %r from %s (%.0f s)", username, address, wait)
            raise HTTPException(
                429,
                detail=f"Too many failed sign-ins; try again in {int(wait) + 1} s.",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        async with self._slots:
            ok = await asyncio.to_thread(self._check_or_register, username, password)
        await asyncio.to_thread(self._record, keys, ok)
        return ok

    def _wait_s(self, keys: tuple[str, str]) -> float:
        return max(self.per_account.wait_s(keys[0]), self.per_address.wait_s(keys[1]))

    def _record(self, keys: tuple[str, str], ok: bool) -> None:
        if ok:
            self.per_account.succeed(keys[0])
            return
        self.per_account.fail(keys[0])
        self.per_address.fail(keys[1])

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
