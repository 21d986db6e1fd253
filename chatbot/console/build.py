"""`build_console`: the operator console's tabs in the current Blocks context, wired together.

Every handler checks on the server that the caller is an admin before doing anything;
hiding the tab is only cosmetic.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import gradio as gr

from chatbot.adapters import load_ab_split
from chatbot.console.adapters_tab import AdaptersTab, build_adapters_tab
from chatbot.console.context import ConsoleContext, UserOf, table
from chatbot.console.data import ConsoleData
from chatbot.console.dialogues_tab import build_dialogues_tab
from chatbot.console.export_tab import build_export_tab
from chatbot.console.learner_data import LearnerData
from chatbot.console.learner_tab import build_learner_tab
from chatbot.console.plots_tab import build_plots_tab
from chatbot.services import Services
from core.types import BASE_ADAPTER

__all__ = ["build_console"]

log = logging.getLogger(__name__)


def build_console(services: Services, user_of: UserOf, browser_id: gr.BrowserState) -> None:
    """Create the console in the current Blocks context; all handlers are admin-only."""
    outer = gr.context.get_render_context()

    with contextlib.suppress(Exception):
        # Keep the persisted A/B split across restarts; a bad adapter must not stop the app.
        services.adapters.set_ab(load_ab_split(services.settings.adapters_dir))

    data = ConsoleData(services)
    learner = LearnerData(services.db, services.settings, services.registry)
    try:
        initial = data.adapter_ids()
    except (OSError, ValueError) as exc:
        log.warning("cannot list adapters: %s", exc)
        initial = [BASE_ADAPTER]
    gr.Markdown("### Operator console", elem_id="console-title")
    status = gr.Markdown("", elem_id="console-status")
    ctx = ConsoleContext(data, learner, user_of, browser_id, status)
    with gr.Tabs():
        adapters = build_adapters_tab(ctx, initial)
        build_learner_tab(ctx)
        loss_pick = build_plots_tab(ctx, initial[1:])
        build_dialogues_tab(ctx)
        build_export_tab(ctx, services)
    _wire_refresh(ctx, adapters, loss_pick, outer)


def _wire_refresh(
    ctx: ConsoleContext, adapters: AdaptersTab, loss_pick: gr.Dropdown, outer: Any
) -> None:
    """The Refresh button, and opening the console tab, reload every adapter list."""
    data = ctx.data

    def refresh(bid: str, request: gr.Request) -> tuple[Any, ...]:
        ctx.admin(request, bid)
        ids = data.adapter_ids()
        usable = data.adapter_ids(usable=True)
        candidates = [i for i in usable if i != data.services.adapters.active]
        return (
            table(data.adapter_rows()),
            gr.update(choices=ids),
            gr.update(choices=usable),
            gr.update(choices=usable),
            gr.update(choices=candidates),
            gr.update(choices=data.dialogue_choices()),
            gr.update(choices=ids[1:]),
            data.status_line(),
        )

    outputs = [
        adapters.table,
        adapters.pick,
        adapters.compare_a,
        adapters.compare_b,
        adapters.ab_candidate,
        adapters.dialogue,
        loss_pick,
        ctx.status,
    ]
    adapters.refresh.click(refresh, [ctx.browser_id], outputs, api_name="console_refresh")
    if isinstance(outer, gr.Tab):
        outer.select(refresh, [ctx.browser_id], outputs, api_visibility="private")
