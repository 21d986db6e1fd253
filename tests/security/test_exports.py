"""Probe 12 of issue 16: an operator's export is served to that operator only."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.security.conftest import ADMIN, ADMIN_SECRET, USER, client, login

pytestmark = pytest.mark.slow

_FORM = ("jsonl", "all", False, "", "", "", "", None, None, "any")


def _href(link_html: str) -> str:
    found = re.search(r'href="([^"]+)"', link_html)
    assert found, link_html
    return found.group(1)


def test_probe12_a_non_admin_cannot_download_an_admins_export(password_app):
    user = client(password_app, USER)
    _, _, history, *_ = user.predict("", api_name="/load")
    user.predict("export-canary-2290 lives here", history, "", api_name="/send")

    admin = client(password_app, ADMIN)
    _, link = admin.predict(*_FORM, "", api_name="/console_export")
    url = password_app.base_url + _href(link)
    assert ADMIN[1] not in link

    user_cookies = login(password_app, *USER).cookies
    for cookies in (user_cookies, None):  # another user, and nobody at all
        r = httpx.get(url, cookies=cookies)
        assert r.status_code == 403 and b"export-canary" not in r.content
    # Gradio's file route does not know the file: nothing to fetch by path there.
    name = re.search(r'download="([^"]+)"', link).group(1)
    r = httpx.get(f"{password_app.base_url}/gradio_api/file={name}", cookies=user_cookies)
    assert r.status_code in (400, 403, 404) and b"export-canary" not in r.content

    admin_cookies = login(password_app, *ADMIN).cookies
    r = httpx.get(url, cookies=admin_cookies)
    assert r.status_code == 200 and b"export-canary-2290" in r.content
    assert httpx.get(url, cookies=admin_cookies).status_code == 404  # one download per link


def test_probe12_anonymous_mode_links_work_once(anon_app):
    operator = client(anon_app)
    obid, *_ = operator.predict("", api_name="/load")
    operator.predict(ADMIN_SECRET, obid, api_name="/operator_sign_in")
    _, link = operator.predict(*_FORM, obid, api_name="/console_export")
    url = anon_app.base_url + _href(link)
    assert httpx.get(url).status_code == 200
    assert httpx.get(url).status_code == 404
    visitor = client(anon_app)
    vbid, *_ = visitor.predict("", api_name="/load")
    with pytest.raises(Exception, match="Operators only"):
        visitor.predict(*_FORM, vbid, api_name="/console_export")
