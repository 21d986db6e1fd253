"""Load: concurrent chat users against the embedded model (prints JSON).

Starts the app as shipped (embedded SmolLM2-135M through llama.cpp, anonymous mode, memory
on) in a temp dir and runs `--users` browsers through Gradio's HTTP API for `--seconds`:
each opens the page (`load`, which streams a greeting), then sends a message, reads the
streamed reply to its end, waits 1-3 s and sends the next. Issue 16's target: 50 users for
5 minutes, 0 failed requests other than a clean "busy" that says to try again; p50/p95
time to first token (TTFT: the send's POST to its first streamed update) reported.

The per-minute message limits are lifted: every browser here shares 127.0.0.1, so the
per-address limit (what a real crowd would each have) would refuse most sends.

    PYTHONPATH=. python bench/chaos/load.py --users 50 --seconds 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench._record import machine
from core.runtime import ensure_embedded_model
from tests.conftest import make_app

_LINES = (
    "Hi! Can you suggest a quick dinner with lentils?",
    "What is a good way to learn the guitar as an adult?",
    "My daughter starts school next week and she is nervous. Any advice?",
    "How do I keep basil alive on a windowsill?",
    "Explain compound interest in two sentences.",
    "We are planning a hike in the Alps. What should we pack?",
)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)  # seconds to open the page

    def add(self, outcome: str, ttft: float | None, total: float, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if ttft is not None:
                self.ttft.append(ttft)
            self.total.append(total)
            if outcome == "failed" and len(self.failures) < 20:
                self.failures.append(detail[:300])


def _call(http: httpx.Client, api: str, data: list) -> tuple[str, float | None, list | None, str]:
    """(last event, seconds to the first update, last data, raw tail) of one Gradio call."""
    started = time.monotonic()
    r = http.post(f"/gradio_api/call/{api}", json={"data": data})
    if r.status_code != 200:
        return f"http-{r.status_code}", None, None, r.text
    event_id = r.json()["event_id"]
    first: float | None = None
    event, last, raw = "", None, ""
    with http.stream("GET", f"/gradio_api/call/{api}/{event_id}") as stream:
        if stream.status_code != 200:
            return f"http-{stream.status_code}", None, None, ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                raw = line[6:]
                if event in ("generating", "complete"):
                    first = first if first is not None else time.monotonic() - started
                    last = _merge(last, json.loads(raw))
    return event, first, last, raw


def _merge(last: list | None, update: list | None) -> list | None:
    """Outputs so far: an update may leave an output out (None) when it did not change."""
    if last is None or update is None:
        return update or last
    return [new if new is not None else old for old, new in zip(last, update, strict=False)]


def _classify(event: str, last: list | None, raw: str) -> str:
    if event != "complete" or last is None:
        return "busy" if re.search(r"busy|try again", raw, re.I) else "failed"
    # send's outputs over HTTP: text box, (state), history, (state), status line, list.
    note = str(last[4])
    if "⚠" in note:
        return "busy" if re.search(r"busy|try again", note, re.I) else "failed"
    return "ok"


def _user(base: str, tally: Tally, until: float, rng: random.Random) -> None:
    with httpx.Client(base_url=base, timeout=httpx.Timeout(600, connect=30)) as http:
        started = time.monotonic()
        try:
            event, _, last, raw = _call(http, "load", [""])
        except httpx.HTTPError as exc:
            tally.add("failed", None, 0.0, f"load: {exc!r}")
            return
        if event != "complete" or last is None:
            tally.add("failed", None, 0.0, f"load: {event} {raw[:200]}")
            return
        with tally.lock:
            tally.loads.append(time.monotonic() - started)
        bid, history = last[0], last[2]
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                event, ttft, last, raw = _call(http, "send", [rng.choice(_LINES), history, bid])
            except httpx.HTTPError as exc:
                tally.add("failed", None, time.monotonic() - started, f"send: {exc!r}")
                continue
            outcome = _classify(event, last, raw)
            detail = f"{event}: {last[4]}" if last is not None else f"{event}: {raw}"
            tally.add(
                outcome, ttft if outcome == "ok" else None, time.monotonic() - started, detail
            )
            if outcome == "ok":
                history = last[2][-6:]
            time.sleep(rng.uniform(1.0, 3.0))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="upc-load-") as tmp:
        root = Path(tmp)
        models = Path(os.environ.get("UPC_TEST_MODELS_DIR") or root / "models")
        embedded = ensure_embedded_model(models)
        data_dir = root / "upc-data"
        (data_dir / "models").mkdir(parents=True)
        os.symlink(embedded, data_dir / "models" / embedded.name)
        app = make_app(
            data_dir,
            root,
            UPC_AUTH__MODE="anonymous",
            UPC_GENERATION__MAX_NEW_TOKENS="96",  # the shipped default
            UPC_LIMITS__MESSAGES_PER_MINUTE="1000000",
            UPC_LIMITS__ADDRESS_MESSAGES_PER_MINUTE="1000000",
        )
        app.start()
        tally = Tally()
        started = time.monotonic()
        until = started + args.seconds
        rng = random.Random(args.seed)
        users = [
            threading.Thread(
                target=_user, args=(app.base_url, tally, until, random.Random(rng.random()))
            )
            for _ in range(args.users)
        ]
        try:
            for u in users:
                u.start()
                time.sleep(0.05)
            for u in users:
                u.join()
            healthy = httpx.get(f"{app.base_url}/healthz", timeout=30).status_code == 200
        finally:
            app.stop()
        elapsed = time.monotonic() - started
    sends = sum(tally.outcomes.values())
    print(
        json.dumps(
            {
                "users": args.users,
                "seconds": args.seconds,
                "wall_s": round(elapsed, 1),
                "sends": sends,
                "outcomes": dict(tally.outcomes),
                "failed": tally.outcomes["failed"],
                "busy": tally.outcomes["busy"],
                "ttft_p50_s": _pct(tally.ttft, 0.5),
                "ttft_p95_s": _pct(tally.ttft, 0.95),
                "page_loads": len(tally.loads),
                "page_load_p50_s": _pct(tally.loads, 0.5),
                "page_load_max_s": _pct(tally.loads, 1.0),
                "reply_p50_s": _pct(tally.total, 0.5),
                "reply_p95_s": _pct(tally.total, 0.95),
                "replies_per_minute": round(tally.outcomes["ok"] / (args.seconds / 60), 1),
                "healthy_after": healthy,
                "failure_examples": tally.failures[:10],
                "machine": machine(),
            },
            indent=2,
        )
    )
    return 0 if tally.outcomes["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
