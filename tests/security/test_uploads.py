"""Probe 11 of issue 16: no feature takes files, so nobody can upload one."""

from __future__ import annotations

import httpx
import pytest

from tests.security.conftest import USER, client, login

pytestmark = pytest.mark.slow


def test_probe11_uploads_are_refused_signed_in_or_not(anon_app, password_app):
    big = b"x" * (20 * 1024 * 1024)
    callers = [
        (anon_app, None),
        (password_app, None),
        (password_app, login(password_app, *USER).cookies),
    ]
    for app, cookies in callers:
        for data in (big, b"a small note"):
            r = httpx.post(
                f"{app.base_url}/gradio_api/upload",
                files={"files": ("note.txt", data)},
                cookies=cookies,
                timeout=120,
            )
            assert r.status_code == 403, (app.base_url, r.status_code, r.text[:200])
            assert "note.txt" not in r.text
    # The page itself, which never uploads, still works.
    bid, _, history, *_ = client(anon_app).predict("", api_name="/load")
    assert len(bid) >= 16 and history
