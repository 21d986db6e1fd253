"""A real headless Chromium drives the chat page (Debian's chromium via Playwright)."""

import shutil

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium must be installed (scripts/test.sh does it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def bot_texts(page):
    return page.locator("#chatbot .bot").all_inner_texts()


def wait_until_settled(page, count: int, quiet_ms: int = 2000, timeout_ms: int = 120_000):
    """Wait until there are `count` bot messages whose text stopped changing and no event
    is still running (on a loaded box a stream may pause longer than `quiet_ms`)."""
    page.evaluate(
        """async ([count, quietMs, timeoutMs]) => {
            let last = null, since = Date.now();
            const t0 = Date.now();
            const running = () => document.querySelector(
                '#chatbot .pending, #chatbot.generating, #chatbot .generating, .progress-text, .eta-bar');
            while (Date.now() - t0 < timeoutMs) {
                const bots = [...document.querySelectorAll('#chatbot .bot')].map(e => e.innerText);
                const key = JSON.stringify(bots) + (running() ? ' running' : '');
                if (key !== last) { last = key; since = Date.now(); }
                else if (!running() && bots.length >= count && bots[count - 1].trim()
                         && Date.now() - since > quietMs) return;
                await new Promise(r => setTimeout(r, 100));
            }
            throw new Error('chat did not settle');
        }""",
        [count, quiet_ms, timeout_ms],
    )


def test_greeting_stream_reload_and_history(browser, running_app):
    context = browser.new_context()
    page = context.new_page()
    page.goto(running_app.base_url, wait_until="domcontentloaded")
    # The bot speaks first.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#chatbot .bot')].some(e => e.innerText.trim().length > 3)",
        timeout=120_000,
    )
    wait_until_settled(page, 1)
    greeting = bot_texts(page)[0].strip()
    assert greeting
    # The message box opens once the greeting has streamed (no second conversation).
    page.wait_for_function(
        "() => !document.querySelector('#message textarea').disabled", timeout=60_000
    )
    page.locator("#message textarea").fill("Hello! I'm a beekeeper and I love jazz.")
    page.locator("#message textarea").press("Enter")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#chatbot .user')].some(e => e.innerText.includes('beekeeper'))",
        timeout=60_000,
    )
    # Watch the reply grow: several different non-empty lengths means it streamed.
    lengths = page.evaluate(
        """async () => {
            const seen = new Set();
            const t0 = Date.now();
            while (Date.now() - t0 < 90000) {
                const bots = document.querySelectorAll('#chatbot .bot');
                if (bots.length >= 2) {
                    const n = bots[bots.length - 1].innerText.trim().length;
                    if (n > 0) seen.add(n);
                }
                const busy = document.querySelector('#chatbot .pending, .progress-text, .eta-bar');
                if (seen.size >= 3 && !busy && bots.length >= 2) break;
                await new Promise(r => setTimeout(r, 30));
            }
            return [...seen];
        }"""
    )
    assert len(lengths) >= 2, f"reply did not stream: {lengths}"
    wait_until_settled(page, 2)
    before = bot_texts(page)
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#chatbot .user')].some(e => e.innerText.includes('beekeeper'))",
        timeout=120_000,
    )
    wait_until_settled(page, 2)
    after = bot_texts(page)
    assert after[0].strip() == before[0].strip() == greeting
    assert after[1].strip() == before[1].strip()
    assert len(after) >= 2
    page.screenshot(path=str(running_app.data_dir.parent / "chat.png"))
    context.close()
