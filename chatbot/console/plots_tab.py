"""The "Plots" tab: validation and regeneration per iteration, score histograms, loss."""

from __future__ import annotations

from typing import Any

import gradio as gr

from chatbot.console.context import ConsoleContext
from chatbot.console.plots import plot_histograms, plot_loss, plot_regeneration, plot_validation

__all__ = ["build_plots_tab"]


def build_plots_tab(ctx: ConsoleContext, adapter_ids: list[str]) -> gr.Dropdown:
    """The tab; returns its adapter pick, which the console-wide refresh fills in."""
    learner = ctx.learner
    with gr.Tab("Plots", id="console-plots"):
        plots_btn = gr.Button("Draw plots")
        with gr.Row():
            validation = gr.Plot(label="Validation rel/int/val and easy rate")
            regeneration = gr.Plot(label="Regeneration rate")
        histograms = gr.Plot(label="Critic score histograms (final replies)")
        with gr.Row():
            pick = gr.Dropdown(
                label="Adapter", choices=adapter_ids, scale=3, allow_custom_value=True
            )
            loss_btn = gr.Button("Show loss", scale=1)
        loss = gr.Plot(label="Training loss")

    # The handlers return matplotlib Figures, left unnamed here: Gradio resolves every hint
    # to find `gr.Request`, and naming Figure would load matplotlib at app start.
    def on_plots(bid: str, request: gr.Request) -> tuple[Any, Any, Any]:
        ctx.admin(request, bid)
        rows = learner.iteration_rows()
        return (
            plot_validation(rows),
            plot_regeneration(rows),
            plot_histograms(learner.score_values()),
        )

    def on_loss(adapter_id: str, bid: str, request: gr.Request) -> Any:
        ctx.admin(request, bid)
        try:
            return plot_loss(learner.loss_history(adapter_id or ""), adapter_id or "")
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc

    plots_btn.click(
        on_plots,
        [ctx.browser_id],
        [validation, regeneration, histograms],
        api_name="console_plots",
    )
    loss_btn.click(on_loss, [pick, ctx.browser_id], [loss], api_name="console_loss")
    return pick
