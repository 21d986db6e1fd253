"""The llama.cpp servers of one model: the one taking requests, and old ones draining.

Starting a server with a new set of adapters never interrupts a request: the new server
takes new requests once it answers, and an old one closes when its last request ends. A
spare child process (Python with xllamacpp imported, no model yet) waits ready, so a swap
pays only for loading the model and adapters.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from core.llamacpp_server import LlamaServer, ServerSpec, ServerStartError, Spare
from core.types import ModelError

__all__ = ["Instance", "ServerPool"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Instance:
    """One started server and the adapters it holds (id -> its LoRA index)."""

    server: LlamaServer
    client: httpx.Client
    loras: dict[str, int]
    in_flight: int = 0
    retired: bool = False
    failed: bool = field(default=False)

    def close(self) -> None:
        self.client.close()
        self.server.close()


class ServerPool:
    def __init__(
        self,
        gguf: str,
        *,
        ctx_tokens: int,
        n_parallel: int,
        threads: int,
        cache_ram_mib: int,
        http_threads: int,
        start_timeout_s: float,
    ):
        self.gguf = gguf
        self.ctx_tokens = ctx_tokens
        self.n_parallel = n_parallel
        self.threads = threads
        self.cache_ram_mib = cache_ram_mib
        self.http_threads = http_threads
        self.start_timeout_s = start_timeout_s
        self.last_start_s = 0.0
        self._current: Instance | None = None
        self._draining: list[Instance] = []
        self._lock = threading.Lock()  # the current instance and in-flight counts
        self._start_lock = threading.Lock()  # one server start at a time
        self._spare: Spare | None = None
        self._wanted: dict[str, Path] = {}
        self._closed = False

    def start(self, loras: dict[str, Path]) -> None:
        """Start a server holding `loras`, switch requests to it, retire the current one.

        Raises ModelError (the current server keeps serving) if it does not come up.
        """
        with self._start_lock:
            self._start_locked(loras)

    def _start_locked(self, loras: dict[str, Path]) -> None:
        if self._closed:
            raise ModelError("the model is shut down")
        started = time.perf_counter()
        instance = self._launch(loras)
        with self._lock:
            old, self._current = self._current, instance
            self._wanted = dict(loras)
            idle_old = old is not None and self._retire(old)
        if idle_old:
            old.close()
        self.last_start_s = time.perf_counter() - started
        self._refill_spare()

    def take(self) -> Instance:
        """The serving instance, counted in-flight until `release`."""
        restart = None
        with self._lock:
            current = self._current
            if current is None:
                raise ModelError("the model is shut down")
            if current.failed or not current.server.alive():
                restart = dict(self._wanted)
        if restart is not None:
            log.error("the llama.cpp server (pid %d) died; starting a new one", current.server.pid)
            self._restart_after_failure(current, restart)
        with self._lock:
            current = self._current
            if current is None:
                raise ModelError("the model is shut down")
            current.in_flight += 1
            return current

    def held(self) -> dict[str, Path]:
        """The LoRA files the serving server holds (adapter id -> file)."""
        with self._lock:
            return dict(self._wanted)

    def current_pid(self) -> int:
        with self._lock:
            if self._current is None:
                raise ModelError("the model is shut down")
            return self._current.server.pid

    def release(self, instance: Instance) -> None:
        with self._lock:
            instance.in_flight -= 1
            done = instance.retired and instance.in_flight == 0
            if done:
                self._draining.remove(instance)
        if done:
            instance.close()

    def report_failure(self, instance: Instance) -> None:
        """A request could not reach the server: check it on the next request."""
        if not instance.server.alive():
            instance.failed = True

    def close(self) -> None:
        with self._start_lock, self._lock:
            self._closed = True
            instances = [i for i in [self._current, *self._draining] if i is not None]
            self._current, self._draining = None, []
            spare, self._spare = self._spare, None
        for instance in instances:
            instance.close()
        if spare is not None:
            spare.close()

    # ----------------------------------------------------------------- internals
    def _retire(self, old: Instance) -> bool:
        """Mark `old` retired; True when it has no request left (close it now)."""
        old.retired = True
        if old.in_flight == 0:
            return True
        self._draining.append(old)
        return False

    def _restart_after_failure(self, dead: Instance, loras: dict[str, Path]) -> None:
        with self._start_lock:
            if self._current is not dead:
                return  # another request restarted it already
            try:
                self._start_locked(loras)
            except ModelError as exc:
                raise ModelError(f"the llama.cpp server died and could not restart: {exc}") from exc

    def _launch(self, loras: dict[str, Path]) -> Instance:
        spec = ServerSpec(
            gguf=self.gguf,
            loras=tuple(str(p) for p in loras.values()),
            ctx_tokens=self.ctx_tokens,
            n_parallel=self.n_parallel,
            threads=self.threads,
            cache_ram_mib=self.cache_ram_mib,
            http_threads=self.http_threads,
        )
        spare, self._spare = self._spare, None
        try:
            server = LlamaServer(spec, timeout_s=self.start_timeout_s, spare=spare)
        except ServerStartError as exc:
            self._refill_spare()
            raise ModelError(str(exc)) from exc
        client = httpx.Client(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {server.api_key}"},
            limits=httpx.Limits(max_connections=self.http_threads, max_keepalive_connections=8),
        )
        instance = Instance(server, client, {name: i for i, name in enumerate(loras)})
        try:
            answer = client.get("/health", timeout=self.start_timeout_s)
        except httpx.HTTPError as exc:
            instance.close()
            raise ModelError(f"the new llama.cpp server does not answer: {exc}") from exc
        if answer.status_code != 200:
            instance.close()
            raise ModelError(f"the new llama.cpp server answers HTTP {answer.status_code}")
        return instance

    def _refill_spare(self) -> None:
        if self._spare is None and not self._closed:
            try:
                self._spare = Spare()
            except OSError as exc:
                log.warning("no spare llama.cpp process (%s); the next swap starts one", exc)
