"""Serve the app: FastAPI with the /v1 API, the Gradio UI mounted at /, origin checks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from urllib.parse import urlparse

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from gradio.routes import App as GradioApp
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot.accounts import UserRecord
from chatbot.api import build_api_router
from chatbot.app import create_app
from chatbot.downloads import DOWNLOAD_ROUTE
from chatbot.memory import MemoryService
from chatbot.services import Services
from chatbot.sessions import SessionTokens, cookie_id
from chatbot.signin import CLIENT_ADDRESS, SignIn
from core.settings import Settings, masked_dict

__all__ = ["EventFunctions", "RequestGuard", "allowed_host_names", "build_server", "launch"]

log = logging.getLogger(__name__)

_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# No part of the app takes files, so Gradio's upload route is closed to everyone (it would
# store any caller's file where any other caller could fetch it by path).
_CLOSED_PATHS = ("/gradio_api/upload", "/upload")
_JOIN_PATH = "/queue/join"


def _host_name(host_header: str) -> str:
    """The name part of a Host header: no port, no IPv6 brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_host_names(settings: Settings) -> frozenset[str]:
    """The bind address, localhost, 127.0.0.1 and any configured `server.allowed_hosts`."""
    extra = {_host_name(h) for h in settings.server.allowed_hosts.split(",") if h.strip()}
    return frozenset({settings.server.host.lower(), *_LOCAL_NAMES, *extra})


@dataclass
class EventFunctions:
    """The Gradio event ids a page may join the queue with (filled once the UI is built).
    Gradio answers an unknown `fn_index` with a KeyError, an HTTP 500 that also drops the
    connection; the guard answers 404 instead."""

    ids: frozenset[int] = frozenset()

    async def check(self, receive: Receive) -> tuple[Receive, bool]:
        """Read the body of a queue join; (a receive that replays it, is its event known)."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, True  # a disconnect: let the app see it as usual
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            fn_index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError, RecursionError):
            fn_index = None  # Gradio refuses a malformed body itself, with a 422
        known = not isinstance(fn_index, int) or fn_index in self.ids
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay, known


class RequestGuard:
    """Refuse foreign Host headers (DNS rebinding), state-changing calls from foreign
    origins and anything with `Origin: null`; remember the caller's address for sign-in."""

    def __init__(
        self,
        app: ASGIApp,
        hosts: frozenset[str],
        origins: frozenset[str],
        functions: EventFunctions | None = None,
    ):
        self.app = app
        self.hosts = hosts
        self.origins = origins
        self.functions = functions or EventFunctions()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        reason = self._refusal(headers, scope.get("method", "GET"), scope.get("path", ""))
        if reason is not None:
            log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), reason)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await JSONResponse({"error": reason}, status_code=403)(scope, receive, send)
            return
        if scope.get("method") == "POST" and scope.get("path", "").endswith(_JOIN_PATH):
            receive, known = await self.functions.check(receive)
            if not known:
                await JSONResponse({"error": "no such event"}, status_code=404)(
                    scope, receive, send
                )
                return
        client = scope.get("client")
        token = CLIENT_ADDRESS.set(client[0] if client else "unknown")
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT_ADDRESS.reset(token)

    def _refusal(self, headers: Headers, method: str, path: str) -> str | None:
        host = headers.get("host", "")
        if _host_name(host) not in self.hosts:
            return "unknown host"
        if path.rstrip("/") in _CLOSED_PATHS:
            return "uploads are off"
        origin = headers.get("origin")
        if origin is None:
            return None
        if origin == "null":
            return "cross-origin request refused"
        same = urlparse(origin).netloc.lower() == host.lower()
        if not same and origin not in self.origins and method not in _SAFE_METHODS:
            return "cross-origin request refused"
        return None


def build_server(services: Services) -> FastAPI:
    settings = services.settings
    app = FastAPI(title="UPC Chat", docs_url=None, redoc_url=None)
    origins = frozenset(o.strip() for o in settings.server.allowed_origins.split(",") if o.strip())
    functions = EventFunctions()
    app.add_middleware(
        RequestGuard, hosts=allowed_host_names(settings), origins=origins, functions=functions
    )
    app.include_router(build_api_router(services))

    @app.get("/healthz")
    def healthz() -> dict:
        # Memory "degraded": Chroma is down and recall runs on the database alone; the
        # replica still serves chat, so `ok` does not depend on it.
        return {
            "ok": services.db.ping(),
            "adapter": services.adapters.active,
            "memory": _memory_health(services.memory),
        }

    password = settings.auth.mode == "password"
    sessions = SessionTokens(services.db, settings.auth.session_max_age_h)
    mounted = _Mounted()
    _add_download_route(app, services, mounted)
    if password:
        _add_logout_route(app, sessions, mounted)

    blocks = create_app(settings, services)
    blocks.queue(default_concurrency_limit=settings.limits.queue_size)
    functions.ids = frozenset(blocks.fns)
    auth = SignIn(services.accounts, settings.auth).check if password else None
    server = gr.mount_gradio_app(
        app,
        blocks,
        path="",
        auth=auth,
        auth_message="Sign in, or choose a new user name and password (8+ characters) to register.",
        blocked_paths=[str(settings.data_dir.resolve())],
        allowed_paths=[],
        footer_links=[],
        ssr_mode=False,
        # Only gr.Error messages reach the page; other exceptions (SQL, paths) stay in the log.
        show_error=False,
        max_file_size="1mb",  # a second line of defence: uploads are refused above
    )
    mounted.gradio = _gradio_app(server)
    if password:
        # Sessions in the database, under a cookie name every replica shares.
        mounted.gradio.tokens = sessions
        mounted.gradio.cookie_id = cookie_id(services.db)
    return server


def _memory_health(memory: MemoryService | None) -> str:
    if memory is None:
        return "off"
    return "ok" if memory.index_available() else "degraded"


@dataclass
class _Mounted:
    """The Gradio app once mounted: its session cookie names the signed-in user."""

    gradio: GradioApp | None = None

    def cookie_names(self) -> tuple[str, ...]:
        if self.gradio is None:
            return ()
        suffix = self.gradio.cookie_id
        return (f"access-token-{suffix}", f"access-token-unsecure-{suffix}")

    def session_user(self, services: Services, request: Request) -> UserRecord | None:
        if self.gradio is None:
            return None
        for name in self.cookie_names():
            token = request.cookies.get(name)
            username = self.gradio.tokens.get(token) if token else None
            if username:
                return services.accounts.by_name(username)
        return None


def _add_logout_route(app: FastAPI, sessions: SessionTokens, mounted: _Mounted) -> None:
    """Answered here, before Gradio's own /logout (which walks an in-memory table): ends
    every session of the caller's user, or only this one with `all_session=false`."""

    @app.get("/logout")
    def logout(request: Request, all_session: bool = True) -> Response:
        response = RedirectResponse(url="./", status_code=302)
        for name in mounted.cookie_names():
            token = request.cookies.get(name)
            if token:
                sessions.revoke(token, everywhere=all_session)
            response.delete_cookie(key=name, path="/")
        return response


def _add_download_route(app: FastAPI, services: Services, mounted: _Mounted) -> None:
    """Operator exports: one download per link, for the admin it was made for only."""

    def refused() -> Response:
        return JSONResponse({"error": "operators only"}, status_code=403)

    @app.get(DOWNLOAD_ROUTE + "/{token}")
    def download(token: str, request: Request) -> Response:
        offer = services.downloads.peek(token)
        if offer is None:
            return JSONResponse({"error": "no such download (used or expired)"}, status_code=404)
        owner = services.accounts.by_id(offer.user_id)
        if owner is None or not owner.is_admin:
            return refused()
        if services.settings.auth.mode == "password":
            caller = mounted.session_user(services, request)
            if caller is None or caller.id != owner.id:
                log.warning("export download refused for %s", caller.id if caller else "nobody")
                return refused()
        offer = services.downloads.take(token)
        if offer is None or not offer.path.is_file():  # used, expired, or erased (upc erase)
            return JSONResponse({"error": "no such download (used or expired)"}, status_code=404)
        return FileResponse(
            offer.path,
            filename=offer.name,
            background=BackgroundTask(offer.path.unlink, missing_ok=True),
        )


def _gradio_app(server: FastAPI) -> GradioApp:
    """The Gradio app mounted inside `server` (its session table lives there)."""
    for route in server.routes:
        inner = getattr(route, "app", None)
        if isinstance(inner, GradioApp):
            return inner
    raise RuntimeError("no Gradio app is mounted")


def launch(settings: Settings, services: Services) -> None:
    import uvicorn

    log.info("effective settings:\n%s", json.dumps(masked_dict(settings), indent=2))
    app = build_server(services)
    log.info("UPC Chat on http://%s:%d", settings.server.host, settings.server.port)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level="warning",
        forwarded_allow_ips=settings.server.trusted_proxies,
        timeout_graceful_shutdown=settings.server.shutdown_grace_s,
    )
