"""The "Export" tab: filtered dialogue exports, handed to the operator as a one-time link.

The link goes through the server's authenticated download route (`chatbot.downloads`),
never through Gradio's file route, which would serve the file to anyone who knows its path.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr

from chatbot.console.context import ConsoleContext
from chatbot.services import Services
from learner.export import (
    ExportFilters,
    ExportOptions,
    ExportProgress,
    export,
    resolve_export_file,
)

__all__ = ["build_export_tab", "export_filters", "export_for_download"]


def _parse_day(text: str | None, name: str) -> datetime | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise gr.Error(f"{name} must be a date like 2025-01-31.") from exc


def export_filters(
    source: str,
    since: str,
    until: str,
    users: str,
    adapter: str,
    min_score: float | None,
    max_score: float | None,
    feedback: str,
) -> ExportFilters:
    """The export library's filters from the console's form fields."""
    return ExportFilters(
        since=_parse_day(since, "From"),
        until=_parse_day(until, "Until"),
        users=tuple(u.strip() for u in (users or "").split(",") if u.strip()),
        adapters=tuple(a.strip() for a in (adapter or "").split(",") if a.strip()),
        min_score=min_score,
        max_score=max_score,
        sources=("real", "synthetic") if source in (None, "", "all") else (source,),
        feedback=feedback or "any",
    )


def export_for_download(
    services: Services,
    fmt: str,
    filters: ExportFilters,
    scrub: bool,
    progress: gr.Progress | None,
    user_id: str,
) -> tuple[str, str, dict[str, Any]]:
    """Run one export and offer its file to `user_id` alone: (link, file name, summary).

    The file is found again through `resolve_export_file`, which accepts only a file
    directly inside this export's directory: nothing a user types becomes a path.
    """

    def report(p: ExportProgress) -> None:
        if progress is not None:
            progress(min(1.0, p.messages / max(1, p.total_messages)), desc=p.phase)

    exports_dir = services.settings.exports_dir
    result = export(
        services.db,
        exports_dir,
        ExportOptions(formats=(fmt,), filters=filters, scrub=scrub),
        progress=report,
        runs_dir=services.settings.runs_dir,
    )
    produced = result.files.get("hf_zip") if fmt == "hf" else result.files.get(fmt)
    if produced is None:
        raise gr.Error("The export produced no file.")
    source = resolve_export_file(exports_dir, result.export_id, Path(produced).name)
    name = f"{result.export_id}-{source.name}"
    link = services.downloads.offer(source, user_id)
    return link, name, result.summary()


def _link_html(link: str, name: str) -> str:
    return (
        f'<a href="{html.escape(link)}" download="{html.escape(name)}" id="export-download">'
        f"Download {html.escape(name)}</a> (one download, within 10 minutes)"
    )


def build_export_tab(ctx: ConsoleContext, services: Services) -> None:
    """The form; the finished file comes back as a one-time link for this operator."""
    with gr.Tab("Export", id="console-export"):
        with gr.Row():
            fmt = gr.Dropdown(
                label="Format", choices=["jsonl", "sharegpt", "parquet", "hf"], value="jsonl"
            )
            source = gr.Dropdown(
                label="Source", choices=["all", "real", "synthetic", "regenerated"], value="all"
            )
            scrub = gr.Checkbox(label="Scrub PII (for shared exports)", value=True)
        with gr.Row():
            since = gr.Textbox(label="From (YYYY-MM-DD)")
            until = gr.Textbox(label="Until (YYYY-MM-DD, exclusive)")
            users = gr.Textbox(label="Users (comma-separated)")
            adapter = gr.Textbox(label="Adapter ids (comma-separated)")
        with gr.Row():
            min_score = gr.Number(label="Min mean critic score (1-5)", value=None)
            max_score = gr.Number(label="Max mean critic score (1-5)", value=None)
            feedback = gr.Dropdown(
                label="Feedback", choices=["any", "liked", "disliked", "none"], value="any"
            )
        export_btn = gr.Button("Export", variant="primary")
        note = gr.Markdown("")
        download = gr.HTML("", elem_id="export-link")

    def on_export(
        fmt: str,
        source: str,
        scrub: bool,
        since: str,
        until: str,
        users: str,
        adapter: str,
        min_score: float | None,
        max_score: float | None,
        feedback: str,
        bid: str,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress tracker
    ) -> tuple[str, str]:
        admin = ctx.admin(request, bid)
        filters = export_filters(
            source, since, until, users, adapter, min_score, max_score, feedback
        )
        try:
            link, name, summary = export_for_download(
                services, fmt, filters, bool(scrub), progress, admin.id
            )
        except (ValueError, OSError) as exc:
            raise gr.Error(f"Export failed: {exc}") from exc
        return _summary_note(summary), _link_html(link, name)

    form = [fmt, source, scrub, since, until, users, adapter, min_score, max_score, feedback]
    export_btn.click(
        on_export,
        [*form, ctx.browser_id],
        [note, download],
        api_name="console_export",
        concurrency_limit=1,
    )


def _summary_note(summary: dict[str, Any]) -> str:
    return (
        f"Exported {summary['conversations']} conversations, {summary['messages']} "
        f"messages in {summary['duration_s']} s · PII scrubbing "
        f"{'on' if summary['scrub_enabled'] else 'off'}: {summary['scrubbed_total']} "
        f"replacements {json.dumps(summary['scrubbed'])}"
    )
