"""Headless Chromium: an admin opens the console, activates an adapter, sees it serving."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from tests.test_console import ADAPTER_ID, ADMIN, start_console_app

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = os.environ.get("UPC_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_admin_activates_an_adapter_in_the_console(tmp_path, tiny_model_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}")
    app = start_console_app(tmp_path, tiny_model_dir)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(app.base_url)
            page.get_by_label("username").fill(ADMIN[0])
            page.get_by_label("password").fill(ADMIN[1])
            page.get_by_role("button", name="Login").click()
            console_tab = page.get_by_role("tab", name="Operator console")
            console_tab.wait_for()
            console_tab.click()
            status = page.locator("#console-status")
            sync_api.expect(status).to_contain_text("Serving: base")
            pick = page.locator("#console-adapter-pick input")
            pick.click()
            page.get_by_role("option", name=ADAPTER_ID).click()
            page.locator("#console-activate").click()
            # Without confirmation nothing changes.
            sync_api.expect(page.locator("#console-action-note")).to_contain_text("confirm")
            assert httpx.get(f"{app.base_url}/healthz").json()["adapter"] == "base"
            page.locator("#console-confirm input").check()
            page.locator("#console-activate").click()
            sync_api.expect(status).to_contain_text(f"Serving: {ADAPTER_ID}")
            sync_api.expect(page.locator("#console-action-note")).to_contain_text("hot-swap")
            sync_api.expect(page.locator("#console-adapters-table")).to_contain_text("serving")
            browser.close()
        assert httpx.get(f"{app.base_url}/healthz").json()["adapter"] == ADAPTER_ID
    finally:
        app.stop()
        if os.environ.get("UPC_KEEP_TEST_LOGS") is None:
            shutil.rmtree(tmp_path / "upc-data", ignore_errors=True)
