"""Probe 9 of issue 16: limits a visitor can't reset with a fresh browser id, covering
regenerate, and operator-secret guesses."""

from __future__ import annotations

import pytest

from tests.security.conftest import ADMIN_SECRET, client, stop_and_clean, tiny_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def limited_app(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sec-limits")
    app = tiny_app(
        root,
        tiny_model_dir,
        UPC_AUTH__MODE="anonymous",
        UPC_ADMIN_SECRET=ADMIN_SECRET,
        UPC_LIMITS__MESSAGES_PER_MINUTE="2",
        UPC_LIMITS__ADDRESS_MESSAGES_PER_MINUTE="3",
    )
    app.start()
    yield app
    stop_and_clean(app, root)


def test_probe9_regenerate_counts_and_a_new_browser_id_does_not_reset_the_limit(limited_app):
    first = client(limited_app)
    bid, _, history, *_ = first.predict("", api_name="/load")
    for text in ("one", "two"):
        _, history, status, _ = first.predict(text, history, bid, api_name="/send")
        assert status == ""
    regenerated, status = first.predict(history, bid, api_name="/regenerate")
    assert "a minute" in status and regenerated == history  # refused, nothing replaced

    second = client(limited_app)  # a fresh identity from the same address
    bid2, _, history2, *_ = second.predict("", api_name="/load")
    _, history2, status, _ = second.predict("three", history2, bid2, api_name="/send")
    assert status == ""
    _, same, status, _ = second.predict("four", history2, bid2, api_name="/send")
    assert "Your network" in status and "a minute" in status and same == history2


def test_probe9_operator_secret_guesses_are_limited_per_address(limited_app):
    for i in range(5):
        visitor = client(limited_app)
        vbid, *_ = visitor.predict("", api_name="/load")
        with pytest.raises(Exception, match="not the admin secret"):
            visitor.predict(f"guess-{i}", vbid, api_name="/operator_sign_in")
    fresh = client(limited_app)
    fbid, *_ = fresh.predict("", api_name="/load")
    with pytest.raises(Exception, match="Too many wrong attempts"):
        fresh.predict(ADMIN_SECRET, fbid, api_name="/operator_sign_in")
