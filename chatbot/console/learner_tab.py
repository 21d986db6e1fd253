"""The "Learner" tab: job status and progress, pause / resume / run now, schedules, history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from chatbot.console.context import ConsoleContext, table
from chatbot.console.learner_data import JOBS

__all__ = ["build_learner_tab"]


def build_learner_tab(ctx: ConsoleContext) -> None:
    learner = ctx.learner
    browser = ctx.browser_id
    with gr.Tab("Learner", id="console-learner") as tab:
        status = gr.Markdown("", elem_id="console-job")
        progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False)
        live = gr.Checkbox(label="Live updates", value=False)
        timer = gr.Timer(2.0, active=False)
        with gr.Row():
            job = gr.Dropdown(
                label="Job", choices=list(JOBS), value="curriculum", allow_custom_value=True
            )
            buttons = {
                "pause": gr.Button("Pause"),
                "resume": gr.Button("Resume"),
                "run_now": gr.Button("Run now", variant="primary"),
            }
        with gr.Row():
            interval = gr.Number(label="Interval (minutes, 0 = off)", value=0, minimum=0)
            schedule_btn = gr.Button("Save schedule")
        schedule_note = gr.Markdown("")
        schedule = gr.Dataframe(headers=["job", "state", "every", "set by"], interactive=False)
        history = gr.Dataframe(
            headers=["job", "trigger", "status", "started", "finished", "counts", "error"],
            interactive=False,
        )

    def on_open(bid: str, request: gr.Request) -> tuple[Any, ...]:
        ctx.admin(request, bid)
        text, fraction = learner.learner_status()
        return (
            text,
            round(100 * fraction, 1),
            table(learner.job_history()),
            table(learner.schedule_rows()),
            gr.update(choices=learner.job_names()),
        )

    def on_live(on: bool, bid: str, request: gr.Request) -> gr.Timer:
        ctx.admin(request, bid)
        return gr.Timer(active=bool(on))

    def on_tick(bid: str, request: gr.Request) -> tuple[str, float]:
        ctx.admin(request, bid)
        text, fraction = learner.learner_status()
        return text, round(100 * fraction, 1)

    def job_handler(action: str) -> Callable[[str, str, gr.Request], tuple[Any, ...]]:
        def handler(name: str, bid: str, request: gr.Request) -> tuple[Any, ...]:
            ctx.admin(request, bid)
            note = learner.job_action(action, name or "")
            return note, table(learner.job_history()), table(learner.schedule_rows())

        return handler

    def on_schedule(name: str, minutes: float, bid: str, request: gr.Request) -> tuple[Any, ...]:
        ctx.admin(request, bid)
        note = learner.set_schedule(name or "", float(minutes or 0))
        return note, table(learner.schedule_rows())

    tab.select(
        on_open, [browser], [status, progress, history, schedule, job], api_name="console_learner"
    )
    live.input(on_live, [live, browser], [timer], api_name="console_live")
    timer.tick(on_tick, [browser], [status, progress], api_name="console_tick")
    for action, button in buttons.items():
        button.click(
            job_handler(action),
            [job, browser],
            [schedule_note, history, schedule],
            api_name=f"console_{action}",
        )
    schedule_btn.click(
        on_schedule,
        [job, interval, browser],
        [schedule_note, schedule],
        api_name="console_schedule",
    )
