"""One llama.cpp server (xllamacpp) in a child process, and its handle in the app.

The server runs in its own process because, in-process, llama.cpp takes over the app's
SIGINT/SIGTERM handling, and a native crash would take the app down with it. The child
reads its spec as one JSON line on stdin, starts the server on a free localhost port,
answers with one JSON line on stdout (`{"address": ...}` or `{"error": ...}`), and then
lives until its stdin closes: when the app closes the handle, or when the app dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LlamaServer", "ServerSpec", "ServerStartError", "Spare"]

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The llama.cpp server did not come up (bad files, no wheel, timeout)."""


@dataclass(frozen=True)
class ServerSpec:
    gguf: str
    # GGUF LoRA files, loaded unapplied: each request picks its own by index.
    loras: tuple[str, ...] = ()
    ctx_tokens: int = 4096  # per slot
    n_parallel: int = 4
    threads: int = 0  # 0: all cores
    cache_ram_mib: int = 256
    http_threads: int = 32


class Spare:
    """A child started ahead of need: Python up and xllamacpp imported, waiting for a spec."""

    def __init__(self) -> None:
        # Kept for the child's lifetime: its tail explains a failed start.
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        # Run by path: the child needs none of the project's packages, only xllamacpp.
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def close(self) -> None:
        _end(self.process, 10.0)
        self.stderr.close()


class LlamaServer:
    """A started llama.cpp server process; `base_url` answers OpenAI-style requests."""

    def __init__(self, spec: ServerSpec, *, timeout_s: float = 120.0, spare: Spare | None = None):
        self.spec = spec
        self.api_key = secrets.token_urlsafe(24)
        started = time.perf_counter()
        spare = spare if spare is not None and spare.process.poll() is None else Spare()
        self._process, self._stderr = spare.process, spare.stderr
        try:
            assert self._process.stdin is not None
            payload = {**dataclasses.asdict(spec), "api_key": self.api_key}
            self._process.stdin.write(json.dumps(payload) + "\n")
            self._process.stdin.flush()
            reply = self._read_reply(timeout_s)
        except BaseException:
            self.close()
            raise
        self.base_url = str(reply["address"])
        self.load_s = float(reply.get("load_s", 0.0))  # in the child: model and adapters
        self.start_s = time.perf_counter() - started

    def _read_reply(self, timeout_s: float) -> dict:
        stdout = self._process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        line = stdout.readline() if ready else ""
        if not ready:
            raise ServerStartError(f"llama.cpp did not start within {timeout_s:.0f}s")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = {"error": f"the server process ended ({self._stderr_tail() or 'no output'})"}
        if "error" in reply:
            raise ServerStartError(str(reply["error"]))
        return reply

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-400:].decode("utf-8", "replace").strip()

    @property
    def pid(self) -> int:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.poll() is None

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the server: closing its stdin ends it; a kill if it doesn't go."""
        _end(self._process, timeout_s)
        self._stderr.close()


def _end(process: subprocess.Popen, timeout_s: float) -> None:
    if process.stdin is not None and not process.stdin.closed:
        with contextlib.suppress(OSError):  # the child is gone already
            process.stdin.close()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)
    if process.stdout is not None:
        process.stdout.close()


def _params(xllamacpp: Any, spec: dict) -> Any:
    params = xllamacpp.CommonParams()
    params.model.path = spec["gguf"]
    params.n_parallel = spec["n_parallel"]
    params.n_ctx = spec["ctx_tokens"] * spec["n_parallel"]
    params.kv_unified = False  # each slot gets its own ctx_tokens
    params.cont_batching = True
    params.cache_prompt = True
    params.cache_ram_mib = spec["cache_ram_mib"]
    threads = spec["threads"] or os.cpu_count() or 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    # Waiting threads sleep instead of spinning: while a new server loads next to a draining
    # one (or anything else shares the cores), spinning threads steal the time slices the
    # others need; alone, this costs no measurable speed.
    params.cpuparams.poll = 0
    params.cpuparams_batch.poll = 0
    # No warm-up decode at start: under a swap it competes with the streams still decoding.
    params.warmup = False
    params.n_threads_http = spec["http_threads"]
    params.port = 0
    params.hostnames = ["127.0.0.1"]
    params.api_keys = [spec["api_key"]]
    params.verbosity = -1
    params.lora_init_without_apply = True
    params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(p, 0.0) for p in spec["loras"]]
    return params


def _reply(message: dict[str, Any]) -> None:
    """One JSON line to the parent on stdout: the child's protocol channel, not a log."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> int:
    # Imported before the spec comes, so a spare child has it ready.
    try:
        import xllamacpp
    except ImportError as exc:
        xllamacpp, missing = None, exc
    line = sys.stdin.readline()
    if not line:
        return 0  # a spare closed unused
    spec = json.loads(line)
    if xllamacpp is None:
        _reply({"error": f"the xllamacpp wheel does not import: {missing}"})
        return 1
    started = time.perf_counter()
    try:
        server = xllamacpp.Server(_params(xllamacpp, spec))
    except (RuntimeError, ValueError, TypeError) as exc:
        _reply({"error": f"llama.cpp could not start: {exc}"})
        return 1
    # llama.cpp installed its own handlers; a plain signal ends this process at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    load_s = time.perf_counter() - started
    _reply({"address": server.listening_address, "load_s": load_s})
    sys.stdin.read()  # returns when the app closes the pipe or dies
    os._exit(0)  # nothing to flush; skip waiting on llama.cpp's threads


if __name__ == "__main__":
    sys.exit(main())
