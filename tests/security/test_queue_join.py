"""Joining Gradio's queue with an event id the page does not have: Gradio raised a KeyError
(HTTP 500, and the connection was dropped); the request guard answers 404. Found by
`tests/security/probes.py`."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_unknown_event_ids_get_404_and_known_ones_still_join(anon_app):
    with httpx.Client(base_url=anon_app.base_url, timeout=30) as http:
        info = http.get("/config").json()
        known = next(d["id"] for d in info["dependencies"] if d.get("api_name") == "load")
        for fn_index in (10_000, -1, 2**40):
            body = {"data": [""], "fn_index": fn_index, "session_hash": "probe12345"}
            r = http.post("/gradio_api/queue/join", json=body)
            assert r.status_code == 404, (fn_index, r.status_code, r.text)
            assert r.json() == {"error": "no such event"}
        # The same connection still works, and a real event still joins the queue.
        body = {"data": [""], "fn_index": known, "session_hash": "probe12345"}
        r = http.post("/gradio_api/queue/join", json=body)
        assert r.status_code == 200 and r.json().get("event_id"), r.text
        # A body that is not JSON is still Gradio's to refuse, below 500.
        r = http.post(
            "/gradio_api/queue/join",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        assert 400 <= r.status_code < 500
