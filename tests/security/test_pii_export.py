"""Probe 15 of issue 16: a scrubbed export keeps no card, IBAN, birth date or other
person's full name that a user typed into the chat."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.security.conftest import ADMIN, USER, client, login

pytestmark = pytest.mark.slow

PLANTED = {
    "card": "4111 1111 1111 1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "dob": "14 March 1987",
    "person": "Sarah O'Connor",
}
LINES = (
    f"my card is {PLANTED['card']} and my IBAN {PLANTED['iban']}",
    f"I was born on {PLANTED['dob']}, tell me my star sign",
    f"my colleague {PLANTED['person']} keeps stealing my lunch; order 1234567890123456",
)


def test_probe15_a_scrubbed_export_drops_cards_ibans_birth_dates_and_names(password_app):
    user = client(password_app, USER)
    _, _, history, *_ = user.predict("", api_name="/load")
    for line in LINES:
        _, history, status, _ = user.predict(line, history, "", api_name="/send")
        assert status == "", status

    admin = client(password_app, ADMIN)
    form = ("jsonl", "all", True, "", "", USER[0], "", None, None, "any")
    summary, link = admin.predict(*form, "", api_name="/console_export")
    counted = json.loads(summary[summary.index("{") :])  # the console's counts
    assert all(counted[kind] >= 1 for kind in PLANTED), counted
    href = re.search(r'href="([^"]+)"', link).group(1)
    r = httpx.get(password_app.base_url + href, cookies=login(password_app, *ADMIN).cookies)
    assert r.status_code == 200
    text = r.text
    for kind, value in PLANTED.items():
        assert value not in text, kind
        assert f"[{kind.upper()}]" in text, kind
    assert "1234567890123456" in text  # an order number is not a card: kept
    assert "star sign" in text  # the rest of the message survives
