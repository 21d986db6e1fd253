"""Headless Chromium on the memory panel: it loads when opened, follows each chat turn, and
the user edits and deletes facts (the deletion reaches Chroma at once)."""

from __future__ import annotations

import sqlite3

import pytest

from tests.test_browser import browser, wait_until_settled  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

# The data cells, five per row (id, fact, category, learned, conversation).
_ROWS_JS = """() => {
    const cells = [...document.querySelectorAll('#memory-facts [role="gridcell"]')]
        .map(c => c.innerText.trim());
    const rows = [];
    for (let i = 0; i + 5 <= cells.length; i += 5) rows.push(cells.slice(i, i + 5));
    return rows.filter(r => r[0]);
}"""


def memory_rows(page, *, including: str = "", timeout_ms: int = 30_000) -> list[list[str]]:
    """The table's rows (id, fact, ...), once a row's fact is `including`."""
    page.wait_for_function(
        f"([text]) => ({_ROWS_JS})().some(cells => cells[1] === text || !text)",
        arg=[including],
        timeout=timeout_ms,
    )
    return page.evaluate(_ROWS_JS)


def wait_for_fact(page, text: str, present: bool = True, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(
        """([text, present]) => {
            const el = document.querySelector('#memory-facts');
            return !!el && el.innerText.includes(text) === present;
        }""",
        arg=[text, present],
        timeout=timeout_ms,
    )


def chroma_ids(chroma_dir) -> set[str]:
    """The fact ids in the app's Chroma store, read from its SQLite file (read-only)."""
    con = sqlite3.connect(f"file:{chroma_dir / 'chroma.sqlite3'}?mode=ro", uri=True)
    try:
        return {row[0] for row in con.execute("SELECT embedding_id FROM embeddings")}
    finally:
        con.close()


def open_chat(page, base_url: str) -> None:
    page.goto(base_url, wait_until="domcontentloaded")
    page.wait_for_function(
        "() => { const t = document.querySelector('#message textarea'); return !!t && !t.disabled; }",
        timeout=180_000,
    )


def send(page, text: str, bots: int) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")
    wait_until_settled(page, bots)


def test_memory_panel_loads_follows_turns_edits_and_deletes(browser, running_app):  # noqa: F811
    context = browser.new_context()
    # A second tab of the same browser (same user), loaded before anything is remembered.
    later = context.new_page()
    open_chat(later, running_app.base_url)
    page = context.new_page()
    open_chat(page, running_app.base_url)
    wait_until_settled(page, 1)

    send(page, "I'm a beekeeper and I live in Lisbon.", 2)
    page.get_by_role("tab", name="What I remember about you").click()
    wait_for_fact(page, "beekeeper")
    wait_for_fact(page, "lives in Lisbon")

    # Another turn while the panel is closed: its table follows without a click.
    page.get_by_role("tab", name="Chat").click()
    send(page, "I moved to Porto last month.", 3)
    wait_for_fact(page, "moved to Porto")
    wait_for_fact(page, "lives in Lisbon", present=False)

    # Opened in the tab that loaded before the chat: the table loads on opening.
    later.get_by_role("tab", name="What I remember about you").click()
    wait_for_fact(later, "beekeeper")
    wait_for_fact(later, "moved to Porto")

    page.get_by_role("tab", name="What I remember about you").click()
    rows = {c[1]: c[0] for c in memory_rows(page, including="moved to Porto last month")}
    assert {"is a beekeeper", "moved to Porto last month"} <= set(rows), rows
    chroma_dir = running_app.data_dir / "chroma"
    assert {rows["is a beekeeper"], rows["moved to Porto last month"]} <= chroma_ids(chroma_dir)

    # Edit: the new text replaces the old one.
    page.locator("#memory-fact-id textarea, #memory-fact-id input").first.fill(
        rows["is a beekeeper"]
    )
    page.locator("#memory-fact-text textarea, #memory-fact-text input").first.fill(
        "keeps bees on a rooftop"
    )
    page.locator("#memory-save").click()
    wait_for_fact(page, "keeps bees on a rooftop")
    wait_for_fact(page, "is a beekeeper", present=False)
    edited = {c[1]: c[0] for c in memory_rows(page, including="keeps bees on a rooftop")}
    assert edited["keeps bees on a rooftop"] == rows["is a beekeeper"]

    # Delete: gone from the table and from Chroma at once.
    porto = rows["moved to Porto last month"]
    page.locator("#memory-fact-id textarea, #memory-fact-id input").first.fill(porto)
    page.locator("#memory-delete").click()
    wait_for_fact(page, "moved to Porto", present=False)
    page.wait_for_function(
        "() => document.querySelector('#memory-note').innerText.includes('Deleted')"
    )
    assert porto not in chroma_ids(chroma_dir)
    assert rows["is a beekeeper"] in chroma_ids(chroma_dir)
    page.screenshot(path=str(running_app.data_dir.parent / "memory.png"))
    context.close()
