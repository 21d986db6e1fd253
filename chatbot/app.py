"""The Gradio web app. `create_app()` builds it; `launch()` serves it with the /v1 API."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import gradio as gr

from chatbot.accounts import AccountError, UserRecord
from chatbot.chat import MessageRecord, NotFoundError
from chatbot.services import Services, session_secret
from core.settings import Settings
from core.validation import InputError

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


def _render(records: list[MessageRecord]) -> tuple[list[dict], list[str | None]]:
    history, ids = [], []
    for m in records:
        content = m.content or ""
        if m.status == "interrupted":
            content = (content + " …" if content else "…") + "\n\n*(interrupted)*"
        history.append({"role": m.role, "content": content})
        ids.append(m.id if m.role == "assistant" else None)
    return history, ids


def create_app(settings: Settings, services: Services) -> gr.Blocks:
    """Build the UI; `launch()` (chatbot.server) serves it. Per-user state comes from the
    request and the browser's own state, never from module variables."""
    chat = services.chat
    anonymous = settings.auth.mode == "anonymous"

    def user_of(request: gr.Request, browser_id: str | None) -> UserRecord:
        return current_user(services, request, browser_id)

    def conversation_choices(user: UserRecord) -> list[tuple[str, str]]:
        return [
            (f"{c.title} · {c.updated_at:%b %d %H:%M}", c.id)
            for c in chat.list_conversations(user.id)
        ]

    def stream_into(events, history: list[dict]) -> Iterator[tuple[list[dict], str]]:
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

    with gr.Blocks(title="UPC Chat", fill_height=True) as demo:
        browser_id = gr.BrowserState(
            "", storage_key="upc-browser-id", secret=session_secret(settings)
        )
        conversation_id = gr.State("")
        message_ids = gr.State([])
        gr.Markdown("## UPC Chat\nA small model that gets to know you and keeps learning.")
        if settings.mode == "demo":
            gr.Markdown(_DEMO_NOTICE, elem_id="demo-notice")
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
        with gr.Tab("Settings", id="settings"):
            gr.Markdown(_LEARNING_NOTE)
            learning_box = gr.Checkbox(
                label="Use my conversations to improve the model", value=True
            )
            memory_box = gr.Checkbox(
                label="Remember facts about me across conversations", value=True
            )
            settings_status = gr.Markdown("")
        memory_panel = None
        if services.memory is not None:
            memory_panel = _memory_tab(services, user_of, browser_id)
        _personas_tab(services)
        admin_tab = _admin_tab(services, user_of, browser_id)

        # ------------------------------------------------------------ handlers
        def on_load(bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
            if anonymous and not bid:
                bid = services.accounts.new_browser_id()
            user = user_of(request, bid)
            choices = conversation_choices(user)
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
            choices = conversation_choices(user)
            for history, note in stream_into(chat.stream_greeting(user.id, cid), []):
                yield (
                    bid,
                    gr.update(choices=choices, value=cid),
                    cid,
                    history,
                    [],
                    note,
                    *waiting,
                    *extra,
                )
            history, ids = _render(chat.messages(user.id, cid))
            yield bid, gr.update(choices=choices, value=cid), cid, history, ids, "", *ready, *extra

        load_outputs = [
            browser_id,
            conversations,
            conversation_id,
            chatbot,
            message_ids,
            status,
            textbox,
            send_button,
            learning_box,
            memory_box,
        ]
        if admin_tab is not None:
            load_outputs.append(admin_tab)
        demo.load(on_load, [browser_id], load_outputs, api_name="load")

        def on_new(bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
            user = user_of(request, bid)
            cid = chat.create_conversation(user.id)
            choices = conversation_choices(user)
            for history, note in stream_into(chat.stream_greeting(user.id, cid), []):
                yield gr.update(choices=choices, value=cid), cid, history, [], note
            history, ids = _render(chat.messages(user.id, cid))
            yield gr.update(choices=choices, value=cid), cid, history, ids, ""

        new_button.click(
            on_new,
            [browser_id],
            [conversations, conversation_id, chatbot, message_ids, status],
            api_name="new_conversation",
        )

        def on_select(cid: str, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
            user = user_of(request, bid)
            if not cid:
                return gr.update(), [], [], ""
            try:
                history, ids = _render(chat.messages(user.id, cid))
            except NotFoundError as exc:
                raise gr.Error("That conversation does not exist.") from exc
            return cid, history, ids, ""

        conversations.input(
            on_select,
            [conversations, browser_id],
            [conversation_id, chatbot, message_ids, status],
            api_name="open_conversation",
        )

        def on_send(text: str, cid: str, history: list[dict], bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
            user = user_of(request, bid)
            try:
                if not cid:
                    cid = chat.create_conversation(user.id)
                events = chat.send(user.id, cid, text)
            except (InputError, NotFoundError) as exc:
                gr.Warning(str(exc))
                yield gr.update(), cid, history, gr.update(), f"⚠️ {exc}", gr.update()
                return
            history = [*history, {"role": "user", "content": text.strip()}]
            choices = gr.update(choices=conversation_choices(user), value=cid)
            for grown, note in stream_into(events, history):
                yield "", cid, grown, gr.update(), note, choices
            final, ids = _render(chat.messages(user.id, cid))
            yield "", cid, final, ids, note, choices

        send_outputs = [textbox, conversation_id, chatbot, message_ids, status, conversations]
        send_inputs = [textbox, conversation_id, chatbot, browser_id]
        limit = settings.limits.queue_size
        textbox.submit(on_send, send_inputs, send_outputs, concurrency_limit=limit, api_name="send")
        send_button.click(
            on_send, send_inputs, send_outputs, concurrency_limit=limit, api_visibility="private"
        )

        def on_regenerate(cid: str, history: list[dict], bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
            user = user_of(request, bid)
            try:
                events = chat.regenerate(user.id, cid)
            except (InputError, NotFoundError) as exc:
                yield history, gr.update(), f"⚠️ {exc}"
                return
            base = history[:-1] if history and history[-1]["role"] == "assistant" else history
            for grown, note in stream_into(events, base):
                yield grown, gr.update(), note
            final, ids = _render(chat.messages(user.id, cid))
            yield final, ids, note

        regenerate_button.click(
            on_regenerate,
            [conversation_id, chatbot, browser_id],
            [chatbot, message_ids, status],
            concurrency_limit=limit,
            api_name="regenerate",
        )

        def on_like(data: gr.LikeData, ids: list, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
            user = user_of(request, bid)
            index = data.index if isinstance(data.index, int) else data.index[0]
            if index >= len(ids) or ids[index] is None:
                return "Only the bot's replies can be rated."
            liked = data.liked
            if liked is True or liked == "Like":
                rating, reason = 1, None
            elif liked is False or liked == "Dislike":
                rating, reason = -1, None
            elif isinstance(liked, str):
                rating, reason = -1, liked
            else:
                return ""
            try:
                chat.rate(user.id, ids[index], rating, reason)
            except (InputError, NotFoundError) as exc:
                return f"⚠️ {exc}"
            return "Thanks for the feedback."

        chatbot.like(on_like, [message_ids, browser_id], [status], api_name="rate")

        def on_prefs(learning: bool, memory_on: bool, bid: str, request: gr.Request) -> str:
            user = user_of(request, bid)
            services.accounts.set_preferences(
                user.id, learning_opt_in=learning, memory_enabled=memory_on
            )
            return (
                f"Saved: learning {'on' if learning else 'off'}, "
                f"memory {'on' if memory_on else 'off'}."
            )

        learning_box.input(
            on_prefs,
            [learning_box, memory_box, browser_id],
            [settings_status],
            api_name="preferences",
        )
        memory_box.input(
            on_prefs,
            [learning_box, memory_box, browser_id],
            [settings_status],
            api_visibility="private",
        )
        if memory_panel is not None:
            memory_panel(demo)
    return demo


def _memory_tab(services: Services, user_of, browser_id) -> Any:  # type: ignore[no-untyped-def]
    memory = services.memory
    with gr.Tab("What I remember about you", id="memory"):
        gr.Markdown(
            "Facts the bot learned about you, with when and where. Delete any of them, or "
            "forget everything. Deleted facts are gone at once."
        )
        table = gr.Dataframe(
            headers=["id", "fact", "category", "learned", "conversation"],
            interactive=False,
            elem_id="memory-facts",
        )
        with gr.Row():
            fact_id = gr.Textbox(label="Fact id to delete", scale=3)
            delete_button = gr.Button("Delete fact", scale=1)
            forget_button = gr.Button("Forget everything", variant="stop", scale=1)
            refresh_button = gr.Button("Refresh", scale=1)
        note = gr.Markdown("")

    def rows(user: UserRecord) -> list[list[str]]:
        return [
            [
                f.id,
                f.text,
                f.category,
                f"{f.updated_at:%Y-%m-%d %H:%M}",
                f.source_conversation_id or "",
            ]
            for f in memory.list_facts(user.id)
        ]

    def refresh(bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        return rows(user_of(request, bid)), ""

    def delete(fid: str, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        user = user_of(request, bid)
        ok = memory.delete_fact(user.id, fid.strip()) if fid.strip() else False
        return rows(user), ("Deleted." if ok else "No such fact.")

    def forget(bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        user = user_of(request, bid)
        count = memory.forget_all(user.id)
        return rows(user), f"Forgot {count} fact(s)."

    def wire(demo: gr.Blocks) -> None:
        refresh_button.click(refresh, [browser_id], [table, note])
        delete_button.click(delete, [fact_id, browser_id], [table, note])
        forget_button.click(forget, [browser_id], [table, note])
        demo.load(refresh, [browser_id], [table, note])

    return wire


def _personas_tab(services: Services) -> None:
    try:
        from personas.catalog import PersonaCatalog
        from personas.ui import build_personas_tab
    except ImportError:
        return
    catalog = PersonaCatalog.load(services.settings.data_dir)
    with gr.Tab("Personas", id="personas"):
        build_personas_tab(catalog)


def _admin_tab(services: Services, user_of, browser_id) -> Any:  # type: ignore[no-untyped-def]
    try:
        from chatbot.console import build_console
        from chatbot.demo_mode import build_operator_signin, console_enabled
    except ImportError:
        return None
    if not console_enabled(services.settings):
        return None  # anonymous mode without an admin secret: no console at all
    with gr.Tab("Operator console", id="console", visible=False) as tab:
        build_console(services, user_of, browser_id)
    if services.settings.auth.mode == "anonymous":
        with gr.Tab("Operator sign-in", id="operator-signin"):
            build_operator_signin(services, user_of, browser_id, tab)
    return tab
