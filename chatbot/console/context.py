"""What every console tab shares: the server-side admin check, the data, the page's state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gradio as gr

from chatbot.accounts import UserRecord
from chatbot.console.data import ConsoleData
from chatbot.console.learner_data import LearnerData

__all__ = ["ConsoleContext", "UserOf", "require_admin", "table"]

log = logging.getLogger(__name__)

_ADMIN_ONLY = "Operators only."

# The app's way to find the caller: the request and the browser's id give the user.
UserOf = Callable[[gr.Request, str | None], UserRecord]


class _Row(Protocol):
    def cells(self) -> list[Any]: ...


def require_admin(user_of: UserOf, request: gr.Request, browser_id: str | None) -> UserRecord:
    """The calling user, if an admin; anyone else gets `gr.Error("Operators only.")`."""
    user = user_of(request, browser_id)
    if not user.is_admin:
        log.warning("console call refused for non-admin user %s", user.id)
        raise gr.Error(_ADMIN_ONLY)
    return user


def table(rows: Sequence[_Row]) -> list[list[Any]]:
    return [r.cells() for r in rows]


@dataclass(frozen=True)
class ConsoleContext:
    """Handed to each tab builder; every handler starts with `ctx.admin(request, bid)`."""

    data: ConsoleData
    learner: LearnerData
    user_of: UserOf
    browser_id: gr.BrowserState
    status: gr.Markdown  # the serving line above the tabs, refreshed after every change

    def admin(self, request: gr.Request, browser_id: str | None) -> UserRecord:
        return require_admin(self.user_of, request, browser_id)
