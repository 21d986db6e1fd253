"""Read-only "Personas" view for the Gradio app: browse and search by split and occupation."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from personas.catalog import PersonaCatalog
from personas.records import SPLITS, Persona

__all__ = ["ALL", "TABLE_COLUMNS", "build_personas_tab", "persona_markdown", "table_rows"]

ALL = "all"
TABLE_COLUMNS = ["id", "name", "split", "group", "occupation", "words", "setback"]


def _group_choices(catalog: PersonaCatalog) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for group in catalog.groups():
        seen[group.code] = f"{group.code} {group.title} ({group.split})"
    return [("all groups", ALL)] + [(label, code) for code, label in sorted(seen.items())]


def table_rows(
    catalog: PersonaCatalog, text: str = "", split: str = ALL, group: str = ALL
) -> list[list[Any]]:
    """Rows of the browse table for a search (split/group `ALL` means no filter)."""
    found = catalog.search(
        text,
        split=None if split in (ALL, None) else split,
        isco_code=None if group in (ALL, None) else group,
    )
    return [
        [
            p.id,
            p.name,
            p.split,
            p.isco_code,
            p.traits.occupation,
            p.word_count,
            "yes" if p.has_setback else "",
        ]
        for p in found
    ]


def persona_markdown(persona: Persona) -> str:
    """Detail view: background and the structured traits (escaped; names are user data)."""
    esc = html.escape
    t = persona.traits
    lines = [f"### {esc(persona.name)}", f"`{esc(persona.id)}` · split **{persona.split}**"]
    if persona.isco_code:
        lines.append(f"ISCO-08 {esc(persona.isco_code)}: {esc(persona.isco_title)}")
    lines += ["", esc(persona.background), "", f"*{persona.word_count} words*"]
    if not t.is_empty:
        facts = [
            ("Occupation", t.occupation),
            ("Education", t.education),
            ("Personality", ", ".join(t.personality)),
            ("Flaws", ", ".join(t.flaws)),
            ("Hobbies", ", ".join(t.hobbies)),
            ("Setback", t.setback or "none"),
            ("Age", str(t.age) if t.age else ""),
            ("Location", t.location),
        ]
        lines += [""] + [f"- **{k}**: {esc(v)}" for k, v in facts if v]
    return "\n".join(lines)


def build_personas_tab(catalog: PersonaCatalog) -> None:
    """Create the components inside the caller's current `gr.Blocks`/`gr.Tab` context."""
    counts = catalog.splits()
    gr.Markdown(
        f"**{len(catalog)} simulated users** · "
        + " · ".join(f"{s} {counts[s]}" for s in SPLITS)
        + " · sets: "
        + ", ".join(catalog.set_names())
    )
    with gr.Row():
        search = gr.Textbox(label="Search", placeholder="name, job, hobby...", scale=3)
        split = gr.Dropdown(
            choices=[("all splits", ALL)] + [(s, s) for s in SPLITS],
            value=ALL,
            label="Split",
            scale=1,
        )
        group = gr.Dropdown(
            choices=_group_choices(catalog), value=ALL, label="Occupation group", scale=2
        )
    table = gr.Dataframe(
        value=table_rows(catalog),
        headers=TABLE_COLUMNS,
        interactive=False,
        wrap=True,
        max_height=420,
        elem_id="personas-table",
    )
    detail = gr.Markdown("Select a row to see the background.", elem_id="personas-detail")

    def refresh(text: str, split_value: str, group_value: str) -> list[list[Any]]:
        return table_rows(catalog, text or "", split_value or ALL, group_value or ALL)

    def show(evt: gr.SelectData) -> str:
        row = evt.row_value or []
        if not row:
            return "Select a row to see the background."
        try:
            return persona_markdown(catalog.get(str(row[0])))
        except KeyError:
            return "That user is no longer in the catalog."

    for component in (search, split, group):
        component.change(refresh, inputs=[search, split, group], outputs=table)
    table.select(show, inputs=None, outputs=detail)
