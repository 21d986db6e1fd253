"""The "Logged dialogues" tab: conversations, their turns with critic scores, user opt-out."""

from __future__ import annotations

from typing import Any

import gradio as gr

from chatbot.console.context import ConsoleContext, table

__all__ = ["build_dialogues_tab"]

_CONVERSATION_HEADERS = [
    "conversation",
    "user",
    "training",
    "title",
    "updated",
    "messages",
    "regenerations",
]
_TURN_HEADERS = [
    "seq",
    "role",
    "adapter",
    "status",
    "content",
    "feedback",
    "rel",
    "int",
    "val",
    "critic reasons",
]


def build_dialogues_tab(ctx: ConsoleContext) -> None:
    data = ctx.data
    browser = ctx.browser_id
    with gr.Tab("Logged dialogues", id="console-dialogues"):
        with gr.Row():
            user_filter = gr.Textbox(label="User name contains", scale=3)
            list_btn = gr.Button("List conversations", scale=1)
        conversations = gr.Dataframe(headers=_CONVERSATION_HEADERS, interactive=False)
        with gr.Row():
            conversation_id = gr.Textbox(label="Conversation id", scale=3)
            open_btn = gr.Button("Open", scale=1)
        turns_title = gr.Markdown("")
        turns = gr.Dataframe(headers=_TURN_HEADERS, interactive=False, wrap=True)
        with gr.Row():
            user = gr.Dropdown(label="User", choices=[], scale=3, allow_custom_value=True)
            excluded = gr.Checkbox(label="Exclude this user's data from training")
            exclude_btn = gr.Button("Save", scale=1)
        exclude_note = gr.Markdown("")

    def on_list(text: str, bid: str, request: gr.Request) -> tuple[Any, ...]:
        ctx.admin(request, bid)
        rows = data.conversation_rows(text or "")
        return table(rows), gr.update(choices=data.user_choices())

    def on_open(cid: str, bid: str, request: gr.Request) -> tuple[Any, ...]:
        ctx.admin(request, bid)
        username, views = data.turns((cid or "").strip())
        return (
            f"**{username}** · {sum(v.role == 'assistant' for v in views)} bot turns",
            table(views),
            gr.update(choices=data.user_choices(), value=username),
            data.is_excluded(username),
        )

    def on_exclude(username: str, exclude: bool, bid: str, request: gr.Request) -> str:
        ctx.admin(request, bid)
        return data.set_excluded(username or "", bool(exclude))

    list_btn.click(
        on_list, [user_filter, browser], [conversations, user], api_name="console_conversations"
    )
    open_btn.click(
        on_open,
        [conversation_id, browser],
        [turns_title, turns, user, excluded],
        api_name="console_open",
    )
    exclude_btn.click(
        on_exclude, [user, excluded, browser], [exclude_note], api_name="console_exclude"
    )
