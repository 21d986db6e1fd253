"""Issue 16's cross-user probes, quick: canaries in four users' chats, a few hundred random
attacks on every endpoint by each user and by nobody (`bench/chaos/probes.py` sends 10,000),
and every console handler called directly as nobody, as a user, and as the admin from a
foreign origin or host."""

from __future__ import annotations

import random

import httpx
import pytest

from tests.security.conftest import cli, stop_and_clean, tiny_app
from tests.security.probes import (
    ADMIN,
    USERS,
    Actor,
    console_matrix,
    export_link,
    probe,
    probe_app_env,
    seed_users,
    summarise_matrix,
)

pytestmark = pytest.mark.slow


def test_no_request_leaks_a_canary_and_every_console_handler_refuses_outsiders(
    tmp_path, tiny_model_dir
):
    app = tiny_app(tmp_path, tiny_model_dir, **probe_app_env())
    for name, password in [ADMIN, *USERS[:3]]:
        extra = ["--admin"] if name == ADMIN[0] else []
        assert cli(app, "users", "add", name, "--password", password, *extra).returncode == 0
    app.start()
    try:
        rng = random.Random(3)
        admin, *users = seed_users(app, [ADMIN, *USERS[:3]], rng)
        nobody = Actor("nobody", httpx.Client(base_url=app.base_url, timeout=60))
        link = export_link(admin)
        matrix = console_matrix(app, admin, users[0], nobody, users[1].conversations[0])
        report = probe(app, [admin, *users], nobody, 300, rng, [link])
        export = admin.client.get(link)  # the attacks did not use the link up
    finally:
        stop_and_clean(app, tmp_path)
    summary = summarise_matrix(matrix)
    assert summary["handlers"] >= 21 and summary["not_refused"] == [], summary
    assert summary["admin_calls_not_reaching_the_handler"] == [], summary
    assert report.leaks == [] and report.server_errors == []
    assert report.requests == 300 and len(report.by_kind) >= 12
    # The canaries were there to be leaked: the admin's export holds every user's.
    assert export.status_code == 200
    assert all(c in export.text for u in users for c in u.canaries)
