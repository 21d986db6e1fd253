"""The Gradio web app. `create_app()` builds it; `launch()` (chatbot.server) serves it.

The page is put together from one builder per panel (chat, settings, memory, personas,
operator console) and one wiring function per group of handlers. Per-user state comes from
the request and the browser's own state, never from module variables.

Gradio reads the handlers' annotations (to pass `gr.Request`, `gr.LikeData`), so every name
in them is imported at module level.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from chatbot.accounts import AccountError, UserRecord
from chatbot.chat import ChatService, MessageRecord, NotFoundError, ReplyEvent, StorageError
from chatbot.console import build_console
from chatbot.console.context import UserOf
from chatbot.demo_mode import build_operator_signin, console_enabled
from chatbot.memory_panel import MemoryPanel, build_memory_panel
from chatbot.services import Services, browser_state_key
from chatbot.signin import client_address
from core.settings import Settings
from core.validation import InputError
from personas.catalog import PersonaCatalog
from personas.ui import build_personas_tab

__all__ = ["create_app", "current_user"]

log = logging.getLogger(__name__)

_FEEDBACK = ["Like", "Dislike", "Off-topic", "Too generic", "Repetitive", "Wrong"]
_DEMO_NOTICE = (
    "**Public demo.** Conversations here are logged and may be used to improve the model. "
    "Please don't share personal data."
)
_LEARNING_NOTE = (
    "Your conversations help the model learn (on by default): a critic rates the bot's "
    "replies after the chat ends and better replies train the next version. Turn this off "
    "to keep your conversations out of training."
)

# The chat window's history, as Gradio's messages format.
History = list[dict[str, str]]
# Outputs of a streaming handler, one tuple per update.
Updates = Iterator[tuple[Any, ...]]


def current_user(
    services: Services, request: gr.Request | None, browser_id: str | None
) -> UserRecord:
    """Who is calling, decided on the server for every event."""
    settings = services.settings
    if settings.auth.mode == "password":
        name = getattr(request, "username", None) if request is not None else None
        user = services.accounts.by_name(name) if name else None
        if user is None:
            raise gr.Error("Please sign in.")
        return user
    try:
        return services.accounts.anonymous(browser_id or "")
    except AccountError as exc:
        raise gr.Error("Your browser session is missing; please reload the page.") from exc


def _render(records: list[MessageRecord]) -> tuple[History, list[str | None]]:
    history, ids = [], []
    for m in records:
        content = m.content or ""
        if m.status == "interrupted":
            content = (content + " …" if content else "…") + "\n\n*(interrupted)*"
        history.append({"role": m.role, "content": content})
        ids.append(m.id if m.role == "assistant" else None)
    return history, ids


def _stream_into(events: Iterable[ReplyEvent], history: History) -> Iterator[tuple[History, str]]:
    """Consume reply events, yielding (history, status) as the reply grows."""
    history = [*history, {"role": "assistant", "content": ""}]
    status = ""
    for event in events:
        if event.kind == "delta":
            history[-1] = {"role": "assistant", "content": history[-1]["content"] + event.text}
            yield history, status
        elif event.kind == "error":
            status = f"⚠️ {event.text} Your message is saved; try **Regenerate**."
            yield history, status
    yield history, status


def _conversation_choices(chat: ChatService, user: UserRecord) -> list[tuple[str, str]]:
    return [
        (f"{c.title} · {c.updated_at:%b %d %H:%M}", c.id) for c in chat.list_conversations(user.id)
    ]


@dataclass(frozen=True)
class _Page:
    """What every handler is handed: the services, the caller lookup and the page's state."""

    services: Services
    user_of: UserOf
    browser_id: gr.BrowserState
    conversation_id: gr.State
    message_ids: gr.State

    @property
    def chat(self) -> ChatService:
        return self.services.chat

    def choices(self, user: UserRecord) -> list[tuple[str, str]]:
        return _conversation_choices(self.services.chat, user)


@dataclass(frozen=True)
class _ChatPanel:
    new_button: gr.Button
    conversations: gr.Radio
    chatbot: gr.Chatbot
    textbox: gr.Textbox
    send_button: gr.Button
    regenerate_button: gr.Button
    status: gr.Markdown


@dataclass(frozen=True)
class _SettingsPanel:
    learning_box: gr.Checkbox
    memory_box: gr.Checkbox
    status: gr.Markdown


def create_app(settings: Settings, services: Services) -> gr.Blocks:
    """Build the UI; `launch()` (chatbot.server) serves it."""

    def user_of(request: gr.Request, browser_id: str | None) -> UserRecord:
        return current_user(services, request, browser_id)

    with gr.Blocks(title="UPC Chat", fill_height=True) as demo:
        page = _Page(
            services,
            user_of,
            browser_id=gr.BrowserState(
                "", storage_key="upc-browser-id", secret=browser_state_key(settings)
            ),
            conversation_id=gr.State(""),
            message_ids=gr.State([]),
        )
        gr.Markdown("## UPC Chat\nA small model that gets to know you and keeps learning.")
        if settings.mode == "demo":
            gr.Markdown(_DEMO_NOTICE, elem_id="demo-notice")
        chat_panel = _chat_tab()
        settings_panel = _settings_tab()
        memory_panel: MemoryPanel | None = None
        if services.memory is not None:
            memory_panel = build_memory_panel(services.memory, user_of, page.browser_id)
        _personas_tab(services)
        admin_tab = _admin_tab(services, user_of, page.browser_id)

        _wire_load(demo, page, chat_panel, settings_panel, admin_tab)
        _wire_conversations(page, chat_panel)
        turns = _wire_replies(page, chat_panel, settings.limits.queue_size)
        _wire_rating(page, chat_panel)
        _wire_preferences(page, settings_panel)
        if memory_panel is not None:
            memory_panel.wire(demo, after_turn=turns)
    return demo


# ---------------------------------------------------------------- panels


def _chat_tab() -> _ChatPanel:
    with gr.Tab("Chat", id="chat"), gr.Row():
        with gr.Column(scale=1, min_width=220):
            new_button = gr.Button("+ New conversation", elem_id="new-conversation")
            conversations = gr.Radio(
                label="Your conversations", choices=[], elem_id="conversations"
            )
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(
                label="UPC",
                elem_id="chatbot",
                height=480,
                feedback_options=_FEEDBACK,
                buttons=["copy"],
            )
            with gr.Row():
                textbox = gr.Textbox(
                    placeholder="Type a message and press Enter",
                    show_label=False,
                    scale=6,
                    max_lines=8,
                    elem_id="message",
                    # Enabled once the page knows its conversation (the greeting has
                    # streamed): an earlier message would start a second conversation.
                    interactive=False,
                )
                send_button = gr.Button(
                    "Send", variant="primary", scale=1, elem_id="send", interactive=False
                )
            with gr.Row():
                regenerate_button = gr.Button("↻ Regenerate", size="sm", elem_id="regenerate")
            status = gr.Markdown("", elem_id="status")
    return _ChatPanel(
        new_button, conversations, chatbot, textbox, send_button, regenerate_button, status
    )


def _settings_tab() -> _SettingsPanel:
    with gr.Tab("Settings", id="settings"):
        gr.Markdown(_LEARNING_NOTE)
        learning_box = gr.Checkbox(label="Use my conversations to improve the model", value=True)
        memory_box = gr.Checkbox(label="Remember facts about me across conversations", value=True)
        status = gr.Markdown("")
    return _SettingsPanel(learning_box, memory_box, status)


def _personas_tab(services: Services) -> None:
    catalog = PersonaCatalog.load(services.settings.data_dir)
    with gr.Tab("Personas", id="personas"):
        build_personas_tab(catalog)


def _admin_tab(services: Services, user_of: UserOf, browser_id: gr.BrowserState) -> gr.Tab | None:
    """The operator console (hidden until an admin loads the page), or None when off."""
    if not console_enabled(services.settings):
        return None  # anonymous mode without an admin secret: no console at all
    with gr.Tab("Operator console", id="console", visible=False) as tab:
        build_console(services, user_of, browser_id)
    if services.settings.auth.mode == "anonymous":
        with gr.Tab("Operator sign-in", id="operator-signin"):
            build_operator_signin(services, user_of, browser_id, tab)
    return tab


# ---------------------------------------------------------------- handlers


def _wire_load(
    demo: gr.Blocks,
    page: _Page,
    panel: _ChatPanel,
    prefs: _SettingsPanel,
    admin_tab: gr.Tab | None,
) -> None:
    """Page load: the browser's id, its conversations, the newest one (or a greeting)."""
    services, chat = page.services, page.chat
    anonymous = services.settings.auth.mode == "anonymous"

    def on_load(bid: str, request: gr.Request) -> Updates:
        if anonymous:
            # Only secrets this server issued name a user; anything else gets a fresh one.
            try:
                user = services.accounts.anonymous(bid or "")
            except AccountError:
                bid, user = services.accounts.issue_anonymous()
        else:
            user = page.user_of(request, bid)
        choices = page.choices(user)
        extra = [gr.update(value=user.learning_opt_in), gr.update(value=user.memory_enabled)]
        if admin_tab is not None:
            extra.append(gr.update(visible=user.is_admin))
        ready = [gr.update(interactive=True)] * 2
        waiting = [gr.update()] * 2
        if choices:
            cid = choices[0][1]
            history, ids = _render(chat.messages(user.id, cid))
            yield (
                bid,
                gr.update(choices=choices, value=cid),
                cid,
                history,
                ids,
                "",
                *ready,
                *extra,
            )
            return
        cid = chat.create_conversation(user.id)
        choices = page.choices(user)
        # A fresh update per yield: Gradio pops "value" out of the dict it is given.
        for history, note in _stream_into(chat.stream_greeting(user.id, cid), []):
            picked = gr.update(choices=choices, value=cid)
            yield bid, picked, cid, history, [], note, *waiting, *extra
        history, ids = _render(chat.messages(user.id, cid))
        yield bid, gr.update(choices=choices, value=cid), cid, history, ids, "", *ready, *extra

    outputs = [
        page.browser_id,
        panel.conversations,
        page.conversation_id,
        panel.chatbot,
        page.message_ids,
        panel.status,
        panel.textbox,
        panel.send_button,
        prefs.learning_box,
        prefs.memory_box,
    ]
    if admin_tab is not None:
        outputs.append(admin_tab)
    demo.load(on_load, [page.browser_id], outputs, api_name="load")


def _wire_conversations(page: _Page, panel: _ChatPanel) -> None:
    """A new conversation (the bot greets first) and opening one of the user's own."""
    chat = page.chat

    def on_new(bid: str, request: gr.Request) -> Updates:
        user = page.user_of(request, bid)
        cid = chat.create_conversation(user.id)
        choices = page.choices(user)
        for history, note in _stream_into(chat.stream_greeting(user.id, cid), []):
            yield gr.update(choices=choices, value=cid), cid, history, [], note
        history, ids = _render(chat.messages(user.id, cid))
        yield gr.update(choices=choices, value=cid), cid, history, ids, ""

    panel.new_button.click(
        on_new,
        [page.browser_id],
        [panel.conversations, page.conversation_id, panel.chatbot, page.message_ids, panel.status],
        api_name="new_conversation",
    )

    def on_select(cid: str, bid: str, request: gr.Request) -> tuple[Any, ...]:
        user = page.user_of(request, bid)
        if not cid:
            return gr.update(), [], [], ""
        try:
            history, ids = _render(chat.messages(user.id, cid))
        except NotFoundError as exc:
            raise gr.Error("That conversation does not exist.") from exc
        return cid, history, ids, ""

    panel.conversations.input(
        on_select,
        [panel.conversations, page.browser_id],
        [page.conversation_id, panel.chatbot, page.message_ids, panel.status],
        api_name="open_conversation",
    )


def _wire_replies(page: _Page, panel: _ChatPanel, limit: int) -> list[Any]:
    """Send and regenerate: the streamed replies, at most `limit` at a time. Returns the
    send events (the memory panel reloads after each)."""
    chat = page.chat

    def on_send(text: str, cid: str, history: History, bid: str, request: gr.Request) -> Updates:
        user = page.user_of(request, bid)
        try:
            if not cid:
                cid = chat.create_conversation(user.id)
            events = chat.send(user.id, cid, text, client=client_address(request))
        except (InputError, NotFoundError, StorageError) as exc:
            gr.Warning(str(exc))
            yield gr.update(), cid, history, gr.update(), f"⚠️ {exc}", gr.update()
            return
        history = [*history, {"role": "user", "content": text.strip()}]
        choices = gr.update(choices=page.choices(user), value=cid)
        note = ""
        for grown, note in _stream_into(events, history):
            yield "", cid, grown, gr.update(), note, choices
        final, ids = _render(chat.messages(user.id, cid))
        yield "", cid, final, ids, note, choices

    send_inputs = [panel.textbox, page.conversation_id, panel.chatbot, page.browser_id]
    send_outputs = [
        panel.textbox,
        page.conversation_id,
        panel.chatbot,
        page.message_ids,
        panel.status,
        panel.conversations,
    ]
    sent = [
        panel.textbox.submit(
            on_send, send_inputs, send_outputs, concurrency_limit=limit, api_name="send"
        ),
        panel.send_button.click(
            on_send, send_inputs, send_outputs, concurrency_limit=limit, api_visibility="private"
        ),
    ]

    def on_regenerate(cid: str, history: History, bid: str, request: gr.Request) -> Updates:
        user = page.user_of(request, bid)
        try:
            events = chat.regenerate(user.id, cid, client=client_address(request))
        except (InputError, NotFoundError, StorageError) as exc:
            yield history, gr.update(), f"⚠️ {exc}"
            return
        base = history[:-1] if history and history[-1]["role"] == "assistant" else history
        note = ""
        for grown, note in _stream_into(events, base):
            yield grown, gr.update(), note
        final, ids = _render(chat.messages(user.id, cid))
        yield final, ids, note

    panel.regenerate_button.click(
        on_regenerate,
        [page.conversation_id, panel.chatbot, page.browser_id],
        [panel.chatbot, page.message_ids, panel.status],
        concurrency_limit=limit,
        api_name="regenerate",
    )
    return sent


def _wire_rating(page: _Page, panel: _ChatPanel) -> None:
    """Likes, dislikes and named feedback on the bot's replies."""
    chat = page.chat

    def on_like(data: gr.LikeData, ids: list[str | None], bid: str, request: gr.Request) -> str:
        user = page.user_of(request, bid)
        index = data.index if isinstance(data.index, int) else data.index[0]
        if index >= len(ids) or ids[index] is None:
            return "Only the bot's replies can be rated."
        rating, reason = _rating(data.liked)
        if rating == 0:
            return ""
        try:
            chat.rate(user.id, ids[index], rating, reason)
        except (InputError, NotFoundError) as exc:
            return f"⚠️ {exc}"
        return "Thanks for the feedback."

    panel.chatbot.like(
        on_like, [page.message_ids, page.browser_id], [panel.status], api_name="rate"
    )


def _rating(liked: object) -> tuple[int, str | None]:
    """(rating, reason) of a like event; a named feedback option is a dislike with a reason.

    0 means no rating (an unlike)."""
    if liked is True or liked == "Like":
        return 1, None
    if liked is False or liked == "Dislike":
        return -1, None
    if isinstance(liked, str):
        return -1, liked
    return 0, None


def _wire_preferences(page: _Page, prefs: _SettingsPanel) -> None:
    """The two opt-outs: learning from the user's conversations, and memory."""

    def on_prefs(learning: bool, memory_on: bool, bid: str, request: gr.Request) -> str:
        user = page.user_of(request, bid)
        page.services.accounts.set_preferences(
            user.id, learning_opt_in=learning, memory_enabled=memory_on
        )
        return (
            f"Saved: learning {'on' if learning else 'off'}, memory {'on' if memory_on else 'off'}."
        )

    inputs = [prefs.learning_box, prefs.memory_box, page.browser_id]
    prefs.learning_box.input(on_prefs, inputs, [prefs.status], api_name="preferences")
    prefs.memory_box.input(on_prefs, inputs, [prefs.status], api_visibility="private")
