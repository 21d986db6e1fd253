"""One-time download links for operator exports.

Gradio's own file route serves any file it has cached to any caller who can see the page,
so an export handed over as a `gr.File` could be fetched by another user who learns its
path. Instead the console copies the export here and gets a random, single-use link that
expires; the server's download route (chatbot.server) checks the caller before serving it
and deletes the copy once sent.

The copies live in a directory of this process under `settings.console_downloads_dir`
(inside the data dir, not the system temp dir), so `upc erase` can find and delete them
from another process; a directory left by a killed process is removed at the next start
once its links would have expired.
"""

from __future__ import annotations

import atexit
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DOWNLOAD_ROUTE", "DownloadOffer", "Downloads"]

log = logging.getLogger(__name__)

DOWNLOAD_ROUTE = "/console/download"
_TTL_S = 600.0


@dataclass(frozen=True)
class DownloadOffer:
    path: Path
    name: str  # the file name the browser saves it under
    user_id: str  # the admin it was made for
    expires: float


class Downloads:
    """The hand-over directory and its live links (token -> offer)."""

    def __init__(
        self,
        root: Path | None = None,
        ttl_s: float = _TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if root is not None:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _remove_stale(root, ttl_s)
        self.dir = Path(tempfile.mkdtemp(prefix="upc-console-downloads-", dir=root))
        self.ttl_s = ttl_s
        self.clock = clock
        self._offers: dict[str, DownloadOffer] = {}
        self._lock = threading.Lock()
        atexit.register(self.close)

    def offer(self, source: Path, user_id: str) -> str:
        """Copy `source` for one download by `user_id`; returns the link's path."""
        token = secrets.token_urlsafe(32)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # another start may prune it
        target = self.dir / f"{token[:12]}-{source.name}"
        shutil.copyfile(source, target)
        with self._lock:
            self._drop_expired()
            self._offers[token] = DownloadOffer(
                target, source.name, user_id, self.clock() + self.ttl_s
            )
        return f"{DOWNLOAD_ROUTE}/{token}"

    def peek(self, token: str) -> DownloadOffer | None:
        """The live offer behind `token`, without using it up."""
        with self._lock:
            self._drop_expired()
            return self._offers.get(token)

    def take(self, token: str) -> DownloadOffer | None:
        """Use the link up; the caller sends the file and deletes it."""
        with self._lock:
            self._drop_expired()
            return self._offers.pop(token, None)

    def close(self) -> None:
        with self._lock:
            self._offers.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _drop_expired(self) -> None:
        now = self.clock()
        for token in [t for t, o in self._offers.items() if o.expires < now]:
            self._offers.pop(token).path.unlink(missing_ok=True)


def _remove_stale(root: Path, ttl_s: float) -> None:
    """Directories of dead processes: untouched for longer than a link lives."""
    cutoff = time.time() - ttl_s
    for child in root.iterdir():
        try:
            if child.is_dir() and child.stat().st_mtime < cutoff:
                shutil.rmtree(child, ignore_errors=True)
        except OSError as exc:  # vanished meanwhile (another process cleaned it)
            log.debug("skipping %s: %s", child, exc)
