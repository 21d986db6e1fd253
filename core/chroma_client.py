"""Chroma clients for the memory index: an embedded directory or a `chroma run` server.

Shared by the app's memory index and by erasure, so both reach the same server the same
way. A server's requests time out after `timeout_s` (Chroma's HTTP client waits forever
by default).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = ["open_chroma"]

log = logging.getLogger(__name__)


def open_chroma(
    *, path: Path | None = None, url: str | None = None, timeout_s: float = 10.0
) -> Any:
    """A Chroma client on the server at `url`, else on the directory `path`.

    Raises ValueError for a URL that names no host, and httpx errors for a server that
    does not answer its heartbeat within `timeout_s`.
    """
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if url:
        parts = urlsplit(url if "//" in url else f"//{url}")
        ssl = parts.scheme == "https"
        if not parts.hostname:
            raise ValueError(f"cannot parse the Chroma URL {url!r}")
        port = parts.port or (443 if ssl else 8000)
        # The client's constructor calls the server with no timeout: ask first, bounded.
        scheme = "https" if ssl else "http"
        httpx.get(
            f"{scheme}://{parts.hostname}:{port}/api/v2/heartbeat", timeout=timeout_s
        ).raise_for_status()
        client = chromadb.HttpClient(
            host=parts.hostname, port=port, ssl=ssl, settings=chroma_settings
        )
        _set_timeout(client, timeout_s)
        return client
    if path is None:
        raise ValueError("a Chroma client needs a directory or a server URL")
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=chroma_settings)


def _set_timeout(client: Any, timeout_s: float) -> None:
    """Bound the HTTP client's requests.

    The client keeps its httpx session on its server API object; without one (another
    client version) requests keep Chroma's own default.
    """
    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        session.timeout = httpx.Timeout(timeout_s)
    else:
        log.warning("cannot bound the Chroma client's request timeout (unknown client)")
