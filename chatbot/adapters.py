"""Which adapter serves which conversation, and live hot-swapping of the active one.

The registry (learner.registry) is the source of truth for the active adapter. A watcher
thread polls it, so `upc adapters activate` in another process reaches the running app
without a restart: the new adapter is loaded next to the current one, requests switch to
it, and the old one is unloaded once no in-flight request uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.types import BASE_ADAPTER, ChatModel

__all__ = ["AB_FILE", "ABSplit", "AdapterManager", "load_ab_split", "save_ab_split"]

log = logging.getLogger(__name__)

AB_FILE = "AB_SPLIT.json"


@dataclass(frozen=True)
class ABSplit:
    candidate: str
    share: float  # 0..1 of conversations routed to the candidate


class AdapterManager:
    def __init__(
        self,
        model: ChatModel,
        source: Callable[[], str] | None = None,
        resolve: Callable[[str], Path] | None = None,
        ab_source: Callable[[], ABSplit | None] | None = None,
        poll_s: float = 2.0,
        on_failure: Callable[[str, str, Exception], None] | None = None,
        prepare_source: Callable[[], list[str]] | None = None,
        prepare_every_s: float = 10.0,
    ):
        self.model = model
        # `source` names the wanted adapter cheaply; `resolve` verifies it and gives its
        # directory, and runs only when the adapter changes.
        self.source = source
        self.resolve = resolve
        self.ab_source = ab_source
        self.poll_s = poll_s
        # Told (wanted, still served, error) when the wanted adapter can't be loaded, so the
        # registry can point back at what is really served.
        self.on_failure = on_failure
        # Adapters likely to be activated next (new candidates): a model that can hold
        # adapters ahead of use (`prepare_adapters`) gets them, so activation is instant.
        self.prepare_source = prepare_source
        self.prepare_every_s = prepare_every_s
        self._prepared: tuple[str, ...] = ()
        self._prepare_at = 0.0
        self._active = BASE_ADAPTER
        self._ab: ABSplit | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_swap_s: float | None = None
        self.last_error: str | None = None

    @property
    def active(self) -> str:
        return self._active

    def adapter_for(self, conversation_id: str) -> str:
        """The adapter for a reply: the A/B candidate for its share of conversations."""
        ab = self._ab
        if ab is not None and ab.share > 0:
            bucket = int(hashlib.sha256(conversation_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            if bucket < ab.share:
                return ab.candidate
        return self._active

    def activate(self, adapter_id: str) -> float:
        """Load the adapter next to the current one, switch to it, unload the old one.

        Raises if the new adapter cannot be loaded; the current one keeps serving.
        """
        with self._lock:
            if adapter_id == self._active:
                return 0.0
            started = time.perf_counter()
            old = self._active
            if adapter_id != BASE_ADAPTER:
                self._ensure_loaded(adapter_id)
            # A serving engine also serves it to clients that name no adapter.
            serve_by_default = getattr(self.model, "serve_by_default", None)
            if serve_by_default is not None:
                serve_by_default(adapter_id)
            self._active = adapter_id
            if old != BASE_ADAPTER and not self._needed_by_ab(old):
                self.model.unload_adapter(old)  # type: ignore[attr-defined]
            self.last_swap_s = time.perf_counter() - started
            log.info("active adapter %s -> %s in %.0f ms", old, adapter_id, 1000 * self.last_swap_s)
            return self.last_swap_s

    def set_ab(self, split: ABSplit | None) -> None:
        with self._lock:
            if split is not None and split.candidate != BASE_ADAPTER:
                self._ensure_loaded(split.candidate)
            previous = self._ab
            self._ab = split
            if (
                previous is not None
                and previous.candidate not in (BASE_ADAPTER, self._active)
                and (split is None or split.candidate != previous.candidate)
            ):
                self.model.unload_adapter(previous.candidate)  # type: ignore[attr-defined]

    def sync(self) -> None:
        """Bring the served adapter in line with the registry; keep serving on failure."""
        try:
            if self.source is not None:
                wanted = self.source()
                if wanted != self._active:
                    self._activate_or_report(wanted)
            if self.ab_source is not None:
                split = self.ab_source()
                if split != self._ab:
                    self.set_ab(split)
            self._prepare()
            self.last_error = None
        except Exception as exc:
            if str(exc) != self.last_error:
                log.error("adapter sync failed, still serving %s: %s", self._active, exc)
            self.last_error = str(exc)

    def _prepare(self) -> None:
        prepare = getattr(self.model, "prepare_adapters", None)
        if prepare is None or self.prepare_source is None or self.resolve is None:
            return
        if time.monotonic() < self._prepare_at:
            return
        self._prepare_at = time.monotonic() + self.prepare_every_s
        wanted = tuple(self.prepare_source())
        if wanted == self._prepared:
            return
        # Recorded first: a set that fails is not retried (and restarted) every poll.
        self._prepared = wanted
        files = {}
        for adapter_id in wanted:
            try:
                files[adapter_id] = self.resolve(adapter_id)
            except Exception as exc:
                log.warning("not preparing adapter %s: %s", adapter_id, exc)
        prepare(files)

    def _activate_or_report(self, wanted: str) -> None:
        try:
            self.activate(wanted)
        except Exception as exc:
            if self.on_failure is not None:
                try:
                    self.on_failure(wanted, self._active, exc)
                except Exception:
                    log.exception("could not report the failed load of %s", wanted)
            raise

    def start(self) -> None:
        if self._thread is not None or self.source is None:
            return
        self._prepare_at = time.monotonic() + self.poll_s  # the watcher prepares, not start-up
        self.sync()
        self._thread = threading.Thread(target=self._watch, name="upc-adapter-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.sync()

    def _ensure_loaded(self, adapter_id: str) -> None:
        loaded = getattr(self.model, "adapters", None)
        if loaded is None:
            return  # remote backends address adapters by model name
        if adapter_id not in loaded:
            if self.resolve is None:
                raise ValueError(f"no way to find the files of adapter {adapter_id}")
            self.model.load_adapter(adapter_id, self.resolve(adapter_id))  # type: ignore[attr-defined]

    def _needed_by_ab(self, adapter_id: str) -> bool:
        return self._ab is not None and self._ab.candidate == adapter_id


def load_ab_split(adapters_dir: Path) -> ABSplit | None:
    """The persisted A/B split (None when off or never set)."""
    path = Path(adapters_dir) / AB_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or not data.get("candidate"):
        return None
    share = float(data.get("share") or 0.0)
    return ABSplit(str(data["candidate"]), share) if share > 0 else None


def save_ab_split(adapters_dir: Path, split: ABSplit | None) -> None:
    """Persist the split atomically next to the registry's ACTIVE file."""
    path = Path(adapters_dir) / AB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"candidate": split.candidate, "share": split.share} if split else {}
    tmp = path.with_name(f".{AB_FILE}.tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    tmp.replace(path)
