"""The "What I remember about you" panel: the user's facts, which they can edit or delete.

The table loads when the page loads and whenever the tab is opened, and follows each chat
turn (the facts of a message are stored before its reply streams). Edits and deletions go
through `MemoryService`, so SQLite and Chroma change together, at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from chatbot.accounts import UserRecord
from chatbot.console.context import UserOf
from chatbot.memory import MemoryService

__all__ = ["MemoryPanel", "build_memory_panel"]

_HEADERS = ["id", "fact", "category", "learned", "conversation"]
_INTRO = (
    "Facts the bot learned about you, with when and where. Pick a row (or paste its id) "
    "to edit or delete it, or forget everything. Changes take effect at once."
)
Rows = list[list[str]]


@dataclass(frozen=True)
class MemoryPanel:
    """The panel's components and what the rest of the page hooks into it."""

    memory: MemoryService
    user_of: UserOf
    browser_id: gr.BrowserState
    tab: gr.Tab
    table: gr.Dataframe
    fact_id: gr.Textbox
    fact_text: gr.Textbox
    save_button: gr.Button
    delete_button: gr.Button
    forget_button: gr.Button
    refresh_button: gr.Button
    note: gr.Markdown

    def rows(self, user: UserRecord) -> Rows:
        return [
            [
                f.id,
                f.text,
                f.category,
                f"{f.updated_at:%Y-%m-%d %H:%M}",
                f.source_conversation_id or "",
            ]
            for f in self.memory.list_facts(user.id)
        ]

    def refresh(self, bid: str, request: gr.Request) -> Rows:
        return self.rows(self.user_of(request, bid))

    def wire(self, demo: gr.Blocks, after_turn: Sequence[Any] = ()) -> None:
        """Connect the handlers; `after_turn`: the chat events after which to reload."""
        refresh = self.refresh
        self.refresh_button.click(refresh, [self.browser_id], [self.table])
        self.tab.select(refresh, [self.browser_id], [self.table])
        demo.load(refresh, [self.browser_id], [self.table])
        for event in after_turn:
            event.then(refresh, [self.browser_id], [self.table])
        edit_outputs = [self.table, self.fact_id, self.fact_text, self.note]
        self.save_button.click(
            self._save, [self.fact_id, self.fact_text, self.browser_id], edit_outputs
        )
        self.delete_button.click(self._delete, [self.fact_id, self.browser_id], edit_outputs)
        self.forget_button.click(self._forget, [self.browser_id], edit_outputs)
        self.table.select(self._pick, None, [self.fact_id, self.fact_text])

    def _save(
        self, fid: str, text: str, bid: str, request: gr.Request
    ) -> tuple[Rows, str, str, str]:
        user = self.user_of(request, bid)
        fid, text = (fid or "").strip(), " ".join((text or "").split())
        if not fid or not text:
            return self.rows(user), fid, text, "Pick a fact and type its new text."
        fact = self.memory.edit_fact(user.id, fid, text)
        if fact is None:
            return self.rows(user), fid, text, "No such fact."
        return self.rows(user), "", "", f"Saved: {fact.text}"

    def _delete(self, fid: str, bid: str, request: gr.Request) -> tuple[Rows, str, str, str]:
        user = self.user_of(request, bid)
        fid = (fid or "").strip()
        ok = self.memory.delete_fact(user.id, fid) if fid else False
        return self.rows(user), "", "", ("Deleted." if ok else "No such fact.")

    def _forget(self, bid: str, request: gr.Request) -> tuple[Rows, str, str, str]:
        user = self.user_of(request, bid)
        count = self.memory.forget_all(user.id)
        return self.rows(user), "", "", f"Forgot {count} fact(s)."

    @staticmethod
    def _pick(event: gr.SelectData) -> tuple[str, str]:
        row = event.row_value or []
        if len(row) < 2:
            return "", ""
        return str(row[0]), str(row[1])


def build_memory_panel(
    memory: MemoryService, user_of: UserOf, browser_id: gr.BrowserState
) -> MemoryPanel:
    """The tab and its components (inside the page's Blocks); wire it once the page is built."""
    with gr.Tab("What I remember about you", id="memory") as tab:
        gr.Markdown(_INTRO)
        table = gr.Dataframe(headers=_HEADERS, interactive=False, elem_id="memory-facts")
        with gr.Row():
            fact_id = gr.Textbox(label="Fact id", scale=2, elem_id="memory-fact-id")
            fact_text = gr.Textbox(label="Fact", scale=4, elem_id="memory-fact-text")
        with gr.Row():
            save_button = gr.Button("Save edit", scale=1, elem_id="memory-save")
            delete_button = gr.Button("Delete fact", scale=1, elem_id="memory-delete")
            forget_button = gr.Button("Forget everything", variant="stop", scale=1)
            refresh_button = gr.Button("Refresh", scale=1, elem_id="memory-refresh")
        note = gr.Markdown("", elem_id="memory-note")
    return MemoryPanel(
        memory,
        user_of,
        browser_id,
        tab,
        table,
        fact_id,
        fact_text,
        save_button,
        delete_button,
        forget_button,
        refresh_button,
        note,
    )
