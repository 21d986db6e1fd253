"""Serve the app: FastAPI with the /v1 API, the Gradio UI mounted at /, origin checks."""

from __future__ import annotations

import json
import logging
from urllib.parse import urlparse

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware

from chatbot.accounts import AccountError
from chatbot.api import build_api_router
from chatbot.app import create_app
from chatbot.services import Services
from core.settings import Settings, masked_dict

__all__ = ["build_server", "launch"]

log = logging.getLogger(__name__)

_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class OriginGuard(BaseHTTPMiddleware):
    """Refuse state-changing calls from foreign origins, and any call with `Origin: null`."""

    def __init__(self, app, allowed: set[str]):  # type: ignore[no-untyped-def]
        super().__init__(app)
        self.allowed = allowed

    async def dispatch(self, request: Request, call_next):  # type: ignore[no-untyped-def]
        origin = request.headers.get("origin")
        if origin is not None:
            host = request.headers.get("host", "")
            parsed = urlparse(origin)
            same = parsed.netloc == host
            if origin == "null" or (
                not same and origin not in self.allowed and request.method not in _SAFE_METHODS
            ):
                return JSONResponse({"error": "cross-origin request refused"}, status_code=403)
        return await call_next(request)


def _auth_callable(services: Services):  # type: ignore[no-untyped-def]
    accounts = services.accounts
    allow_signup = services.settings.auth.allow_signup

    def check(username: str, password: str) -> bool:
        if accounts.verify(username, password) is not None:
            return True
        if allow_signup and accounts.by_name(username) is None:
            # First sign-in with a new name registers it (the login page has no sign-up form).
            try:
                accounts.create(username, password)
            except AccountError as exc:
                log.info("sign-up refused for %r: %s", username, exc)
                return False
            return True
        return False

    return check


def build_server(services: Services) -> FastAPI:
    settings = services.settings
    app = FastAPI(title="UPC Chat", docs_url=None, redoc_url=None)
    allowed = {o.strip() for o in settings.server.allowed_origins.split(",") if o.strip()}
    app.add_middleware(OriginGuard, allowed=allowed)
    app.include_router(build_api_router(services))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": services.db.ping(), "adapter": services.adapters.active}

    blocks = create_app(settings, services)
    blocks.queue(default_concurrency_limit=settings.limits.queue_size)
    auth = _auth_callable(services) if settings.auth.mode == "password" else None
    return gr.mount_gradio_app(
        app,
        blocks,
        path="",
        auth=auth,
        auth_message="Sign in, or choose a new user name and password (8+ characters) to register.",
        blocked_paths=[str(settings.data_dir.resolve())],
        allowed_paths=[],
        footer_links=[],
        ssr_mode=False,
    )


def launch(settings: Settings, services: Services) -> None:
    import uvicorn

    log.info("effective settings:\n%s", json.dumps(masked_dict(settings), indent=2))
    app = build_server(services)
    log.info("UPC Chat on http://%s:%d", settings.server.host, settings.server.port)
    uvicorn.run(app, host=settings.server.host, port=settings.server.port, log_level="warning")
