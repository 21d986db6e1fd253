"""A blind side-by-side reader of two systems' dialogues, for people to judge.

Two systems talked to the same users with the same seeds (``upc eval``). Each item of the
page is one (user, seed): the user's background (or only their name, when hidden) and the
two systems' conversations with that user, labelled A and B in a random order per item.
A person picks A, B or "tie" per item; a small inline script tallies the choices and saves
them as JSON. The key that says which system is A is written to a separate JSON file and is
never in the HTML; ``unblind`` joins saved answers with the key.

The conversations differ from the first reply on (each system's reply shapes what the
simulated user says next), so each reply is read in its own system's conversation; what the
two sides share is the user, the seed and the opening.
"""

from __future__ import annotations

import html
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from learner.eval_report import TranscriptRow, read_transcripts

__all__ = [
    "SideBySideItem",
    "SideBySideTally",
    "build_items",
    "key_path",
    "pick_system",
    "render_html",
    "unblind",
    "write_side_by_side",
]

CHOICES = ("A", "B", "tie")


@dataclass(frozen=True)
class SideBySideItem:
    item_id: str
    persona_id: str
    persona_name: str
    background: str
    seed: int
    a: TranscriptRow
    b: TranscriptRow


@dataclass
class SideBySideTally:
    """Choices per system name after unblinding (``tie`` counts both-equal)."""

    wins: dict[str, int] = field(default_factory=dict)
    ties: int = 0
    answered: int = 0
    items: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_system(rows: Sequence[TranscriptRow], name: str | None, source: str) -> str:
    """The system ``name`` of ``rows``, or the only system there when ``name`` is None."""
    names = sorted({r.system for r in rows})
    if name is not None:
        if name not in names:
            raise ValueError(f"{source} has no system {name!r} (it has {', '.join(names)})")
        return name
    if len(names) != 1:
        raise ValueError(f"{source} holds systems {', '.join(names)}: name one")
    return names[0]


def build_items(
    rows_a: Sequence[TranscriptRow],
    system_a: str,
    rows_b: Sequence[TranscriptRow],
    system_b: str,
    *,
    n: int | None = 50,
    seed: int = 0,
) -> list[SideBySideItem]:
    """Pair the two systems' dialogues by (user, seed); sample ``n`` pairs, shuffle sides."""
    if system_a == system_b and rows_a is rows_b:
        raise ValueError(f"both sides are {system_a!r} of the same transcripts")
    first = {(r.persona_id, r.seed): r for r in rows_a if r.system == system_a}
    second = {(r.persona_id, r.seed): r for r in rows_b if r.system == system_b}
    keys = sorted(set(first) & set(second))
    if not keys:
        raise ValueError(f"{system_a} and {system_b} share no (user, seed) dialogue")
    rng = random.Random(seed)
    if n is not None and n < len(keys):
        keys = sorted(rng.sample(keys, n))
    rng.shuffle(keys)
    items = []
    for number, key in enumerate(keys, start=1):
        left, right = first[key], second[key]
        if rng.random() < 0.5:
            left, right = right, left
        items.append(
            SideBySideItem(
                item_id=f"item-{number:03d}",
                persona_id=left.persona_id,
                persona_name=left.persona_name,
                background=left.background,
                seed=left.seed,
                a=left,
                b=right,
            )
        )
    return items


def _messages(row: TranscriptRow) -> list[tuple[str, str]]:
    dialogue = row.dialogue
    out = [("bot", dialogue.get("greeting", "")), ("user", dialogue.get("user_intro", ""))]
    for turn in dialogue.get("turns", []):
        out.append(("bot", turn.get("final_reply", "")))
        if turn.get("user_answer"):
            out.append(("user", turn["user_answer"]))
    return [(who, text) for who, text in out if text]


def _conversation(label: str, row: TranscriptRow, user_name: str) -> str:
    lines = [f'<div class="side"><h3>{label}</h3>']
    for who, text in _messages(row):
        speaker = "Chatbot" if who == "bot" else html.escape(user_name)
        lines.append(
            f'<p class="{who}"><b>{speaker}:</b> {html.escape(text).replace(chr(10), "<br>")}</p>'
        )
    lines.append("</div>")
    return "\n".join(lines)


_STYLE = """
body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}
.item{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}
.pair{display:flex;gap:1em}.side{flex:1;background:#fafafa;padding:.5em;border-radius:4px}
p.bot{background:#eef4ff;padding:.3em}p.user{padding:.3em}
.choice label{margin-right:1.5em}#tally{position:sticky;top:0;background:#fff;padding:.5em}
"""

_SCRIPT = """
const choices = () => {
  const out = {};
  document.querySelectorAll('input[type=radio]:checked').forEach(r => { out[r.name] = r.value; });
  return out;
};
const update = () => {
  const c = choices(); const n = {A: 0, B: 0, tie: 0};
  Object.values(c).forEach(v => { n[v] += 1; });
  document.getElementById('tally').textContent =
    `answered ${Object.keys(c).length} of ${TOTAL}: A ${n.A}, B ${n.B}, tie ${n.tie}`;
};
document.querySelectorAll('input[type=radio]').forEach(r => r.addEventListener('change', update));
document.getElementById('save').addEventListener('click', () => {
  const blob = new Blob([JSON.stringify({page: PAGE, answers: choices()}, null, 2)],
                        {type: 'application/json'});
  const link = document.createElement('a');
  link.href = URL.createObjectURL(blob); link.download = PAGE + '-answers.json'; link.click();
});
update();
"""


def render_html(items: Sequence[SideBySideItem], *, page_id: str, show_persona: bool) -> str:
    """A self-contained page (no external resources); every text from a dialogue is escaped."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Side by side: {html.escape(page_id)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Which chatbot served this person better?</h1>",
        "<p>Each item shows one person and two conversations a chatbot had with them. Judge "
        "which chatbot found out more about the person and talked about what matters to them, "
        "with replies of substance. The sides are shuffled per item.</p>",
        '<div id="tally"></div><button id="save">Download my answers</button>',
    ]
    for item in items:
        who = html.escape(item.persona_name)
        about = (
            f"<p><b>{who}</b>: {html.escape(item.background)}</p>"
            if show_persona
            else f"<p><b>{who}</b> (background hidden)</p>"
        )
        radios = " ".join(
            f'<label><input type="radio" name="{item.item_id}" value="{c}"> '
            f"{'A and B are equal' if c == 'tie' else c + ' is better'}</label>"
            for c in CHOICES
        )
        parts += [
            f'<div class="item" id="{item.item_id}"><h2>{item.item_id}</h2>',
            about,
            '<div class="pair">',
            _conversation("A", item.a, item.persona_name),
            _conversation("B", item.b, item.persona_name),
            "</div>",
            f'<div class="choice">{radios}</div></div>',
        ]
    constants = f"const TOTAL = {len(items)}; const PAGE = {json.dumps(page_id)};"
    parts += [f"<script>{constants}{_SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def key_path(out: Path) -> Path:
    return out.with_name(out.stem + ".key.json")


def write_side_by_side(
    a: str | Path,
    b: str | Path,
    out: str | Path,
    *,
    system_a: str | None = None,
    system_b: str | None = None,
    n: int | None = 50,
    seed: int = 0,
    show_persona: bool = True,
) -> tuple[Path, Path, int]:
    """Write the page and its key (``<out stem>.key.json``); return both paths and the count."""
    rows_a = read_transcripts(a)
    rows_b = rows_a if Path(b) == Path(a) else read_transcripts(b)
    name_a = pick_system(rows_a, system_a, str(a))
    name_b = pick_system(rows_b, system_b, str(b))
    items = build_items(rows_a, name_a, rows_b, name_b, n=n, seed=seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page_id = out.stem
    out.write_text(render_html(items, page_id=page_id, show_persona=show_persona), "utf-8")
    key = {
        "page": page_id,
        "a_source": str(a),
        "b_source": str(b),
        "systems": [name_a, name_b],
        "seed": seed,
        "items": {
            it.item_id: {
                "A": it.a.system,
                "B": it.b.system,
                "persona_id": it.persona_id,
                "seed": it.seed,
            }
            for it in items
        },
    }
    path = key_path(out)
    path.write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return out, path, len(items)


def unblind(key: dict[str, Any], answers: dict[str, Any]) -> SideBySideTally:
    """Wins per system from a key and the answers a person saved from the page."""
    if answers.get("page") not in (None, key.get("page")):
        raise ValueError(f"answers are for page {answers.get('page')!r}, not {key.get('page')!r}")
    tally = SideBySideTally(wins={name: 0 for name in key["systems"]}, items=len(key["items"]))
    for item_id, choice in answers.get("answers", {}).items():
        if item_id not in key["items"]:
            raise ValueError(f"unknown item {item_id!r}")
        if choice not in CHOICES:
            raise ValueError(f"{item_id}: choice {choice!r} is not one of {', '.join(CHOICES)}")
        tally.answered += 1
        if choice == "tie":
            tally.ties += 1
        else:
            tally.wins[key["items"][item_id][choice]] += 1
    return tally
