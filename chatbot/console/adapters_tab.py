"""The "Adapters" tab: the registry table, activate / roll back / retire, compare, A/B split."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import gradio as gr

from chatbot.console.context import ConsoleContext, table
from chatbot.console.records import DIMS, CompareSide, fmt
from core.types import BASE_ADAPTER

__all__ = ["AdaptersTab", "build_adapters_tab", "render_compare"]

_ADAPTER_HEADERS = [
    "id",
    "parent",
    "iteration",
    "created",
    "training set",
    "val rel",
    "val int",
    "val val",
    "gate",
    "status",
]
_ARM_HEADERS = [
    "arm",
    "adapter",
    "replies",
    "likes",
    "dislikes",
    "like rate",
    "scored",
    "rel",
    "int",
    "val",
]


@dataclass(frozen=True)
class AdaptersTab:
    """What the console-wide refresh fills in."""

    table: gr.Dataframe
    pick: gr.Dropdown
    refresh: gr.Button
    compare_a: gr.Dropdown
    compare_b: gr.Dropdown
    dialogue: gr.Dropdown
    ab_candidate: gr.Dropdown


@dataclass(frozen=True)
class _Manage:
    table: gr.Dataframe
    pick: gr.Dropdown
    confirm: gr.Checkbox
    refresh: gr.Button
    activate: gr.Button
    rollback: gr.Button
    retire: gr.Button
    note: gr.Markdown


def render_compare(side: CompareSide) -> str:
    parts = [f"### `{side.adapter}`"]
    for turn in side.turns:
        score = turn.score
        scores = (
            " · ".join(f"{d} **{fmt(score.value(d))}**" for d in DIMS)
            if score.scored
            else "unscored"
        )
        parts.append(f"**User:** {turn.user_text}\n\n**Bot:** {turn.reply}\n\n{scores}")
    means = []
    for d in DIMS:
        vals = [t.score.value(d) for t in side.turns if t.score.scored]
        means.append(f"{d} {statistics.fmean(vals):.2f}" if vals else f"{d} -")
    parts.append("**Mean:** " + " · ".join(means))
    return "\n\n---\n\n".join(parts)


def build_adapters_tab(ctx: ConsoleContext, initial: list[str]) -> AdaptersTab:
    with gr.Tab("Adapters", id="console-adapters"):
        manage = _manage_ui(initial)
        _wire_manage(ctx, manage)
        compare_a, compare_b, dialogue = _compare(ctx, initial)
        ab_candidate = _ab_split(ctx, initial)
    return AdaptersTab(
        manage.table, manage.pick, manage.refresh, compare_a, compare_b, dialogue, ab_candidate
    )


def _manage_ui(initial: list[str]) -> _Manage:
    adapters_table = gr.Dataframe(
        headers=_ADAPTER_HEADERS, interactive=False, elem_id="console-adapters-table"
    )
    with gr.Row():
        pick = gr.Dropdown(
            label="Adapter",
            choices=initial,
            value=BASE_ADAPTER,
            elem_id="console-adapter-pick",
            scale=3,
            allow_custom_value=True,
        )
        confirm = gr.Checkbox(
            label="Yes, I confirm", value=False, elem_id="console-confirm", scale=1
        )
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="console-refresh")
        activate = gr.Button("Activate", variant="primary", elem_id="console-activate")
        rollback = gr.Button("Roll back", elem_id="console-rollback")
        retire = gr.Button("Retire", variant="stop", elem_id="console-retire")
    note = gr.Markdown("", elem_id="console-action-note")
    return _Manage(adapters_table, pick, confirm, refresh, activate, rollback, retire, note)


def _wire_manage(ctx: ConsoleContext, ui: _Manage) -> None:
    data = ctx.data

    def after_change(note: str) -> tuple[Any, ...]:
        return table(data.adapter_rows()), note, data.status_line(), False

    def unconfirmed(verb: str) -> tuple[Any, ...]:
        # Nothing changes; a note rather than an error keeps the form usable.
        return gr.update(), f"⚠️ Tick 'Yes, I confirm' to {verb}.", gr.update(), False

    def on_activate(adapter_id: str, ok: bool, bid: str, request: gr.Request) -> tuple[Any, ...]:
        ctx.admin(request, bid)
        if not ok:
            return unconfirmed("activate")
        try:
            seconds = data.activate(adapter_id or BASE_ADAPTER)
        except (ValueError, OSError, RuntimeError) as exc:
            raise gr.Error(f"Not activated: {exc}") from exc
        return after_change(f"Activated `{adapter_id}` · hot-swap {1000 * seconds:.0f} ms")

    def on_rollback(ok: bool, bid: str, request: gr.Request) -> tuple[Any, ...]:
        ctx.admin(request, bid)
        if not ok:
            return unconfirmed("roll back")
        try:
            target, seconds = data.rollback()
        except (ValueError, OSError, RuntimeError) as exc:
            raise gr.Error(f"Not rolled back: {exc}") from exc
        return after_change(f"Rolled back to `{target}` · hot-swap {1000 * seconds:.0f} ms")

    def on_retire(adapter_id: str, ok: bool, bid: str, request: gr.Request) -> tuple[Any, ...]:
        ctx.admin(request, bid)
        if not ok:
            return unconfirmed("retire")
        try:
            data.retire(adapter_id)
        except (ValueError, OSError) as exc:
            raise gr.Error(f"Not retired: {exc}") from exc
        return after_change(f"Retired `{adapter_id}`.")

    browser = ctx.browser_id
    outputs = [ui.table, ui.note, ctx.status, ui.confirm]
    for button, handler, inputs, name in (
        (ui.activate, on_activate, [ui.pick, ui.confirm, browser], "console_activate"),
        (ui.rollback, on_rollback, [ui.confirm, browser], "console_rollback"),
        (ui.retire, on_retire, [ui.pick, ui.confirm, browser], "console_retire"),
    ):
        button.click(handler, inputs, outputs, api_name=name, show_progress="minimal")


def _compare(
    ctx: ConsoleContext, initial: list[str]
) -> tuple[gr.Dropdown, gr.Dropdown, gr.Dropdown]:
    """Two adapters answer one prompt, or replay a stored persona dialogue, side by side."""
    gr.Markdown("#### Compare two adapters")
    with gr.Row():
        left_pick = gr.Dropdown(
            label="Left", choices=initial, value=BASE_ADAPTER, allow_custom_value=True
        )
        right_pick = gr.Dropdown(
            label="Right", choices=initial, value=BASE_ADAPTER, allow_custom_value=True
        )
    prompt = gr.Textbox(label="Prompt (one user message)", max_lines=4)
    background = gr.Textbox(label="Who the user is (for the critic; optional)", max_lines=3)
    dialogue = gr.Dropdown(
        label="…or replay a stored persona dialogue", choices=[], allow_custom_value=True
    )
    with gr.Row():
        prompt_btn = gr.Button("Compare prompt")
        replay_btn = gr.Button("Replay dialogue")
    with gr.Row():
        left = gr.Markdown("")
        right = gr.Markdown("")

    def on_compare(
        text: str, who: str, a: str, b: str, bid: str, request: gr.Request
    ) -> tuple[str, str]:
        ctx.admin(request, bid)
        sides = ctx.data.compare_prompt(text, who, a or BASE_ADAPTER, b or BASE_ADAPTER)
        return render_compare(sides[0]), render_compare(sides[1])

    def on_replay(
        dialogue_id: str, a: str, b: str, bid: str, request: gr.Request
    ) -> tuple[str, str]:
        ctx.admin(request, bid)
        sides = ctx.data.compare_replay(dialogue_id, a or BASE_ADAPTER, b or BASE_ADAPTER)
        return render_compare(sides[0]), render_compare(sides[1])

    browser = ctx.browser_id
    prompt_btn.click(
        on_compare,
        [prompt, background, left_pick, right_pick, browser],
        [left, right],
        api_name="console_compare",
        concurrency_limit=1,
    )
    replay_btn.click(
        on_replay,
        [dialogue, left_pick, right_pick, browser],
        [left, right],
        api_name="console_replay",
        concurrency_limit=1,
    )
    return left_pick, right_pick, dialogue


def _ab_split(ctx: ConsoleContext, initial: list[str]) -> gr.Dropdown:
    """Route a share of new conversations to a candidate adapter; compare the two arms."""
    gr.Markdown("#### A/B split of new conversations")
    with gr.Row():
        candidate = gr.Dropdown(
            label="Candidate", choices=initial, value=None, allow_custom_value=True
        )
        share = gr.Slider(0, 100, value=0, step=5, label="Share of conversations (%)")
        confirm = gr.Checkbox(label="Yes, I confirm", value=False)
    with gr.Row():
        set_btn = gr.Button("Apply split")
        stats_btn = gr.Button("Arm statistics")
    arms = gr.Dataframe(headers=_ARM_HEADERS, interactive=False)
    note = gr.Markdown("")

    def on_set(
        adapter_id: str, percent: float, ok: bool, bid: str, request: gr.Request
    ) -> tuple[Any, ...]:
        ctx.admin(request, bid)
        if not ok:
            return "⚠️ Tick 'Yes, I confirm' to change the split.", gr.update(), False
        try:
            split = ctx.data.set_ab(adapter_id or "", float(percent or 0) / 100.0)
        except (ValueError, OSError) as exc:
            raise gr.Error(f"Split not changed: {exc}") from exc
        text = (
            f"{100 * split.share:.0f}% of new conversations go to `{split.candidate}`."
            if split
            else "A/B split is off."
        )
        return text, ctx.data.status_line(), False

    def on_stats(bid: str, request: gr.Request) -> list[list[Any]]:
        ctx.admin(request, bid)
        return table(ctx.data.arm_stats())

    set_btn.click(
        on_set,
        [candidate, share, confirm, ctx.browser_id],
        [note, ctx.status, confirm],
        api_name="console_ab_set",
        show_progress="minimal",
    )
    stats_btn.click(on_stats, [ctx.browser_id], [arms], api_name="console_ab_stats")
    return candidate
