"""Shared by the bench scripts: machine description and appending results to the docs."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["machine", "record"]

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> dict:
    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def record(name: str, result: dict, *, doc: Path = DOC) -> None:
    """Print the JSON result and append it, with command, machine and date, to the doc."""
    result = {**result, "machine": result.get("machine") or machine()}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if os.environ.get("UPC_BENCH_NO_RECORD"):
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc.parent.mkdir(parents=True, exist_ok=True)
    with doc.open("a", encoding="utf-8") as fh:
        fh.write(f"\n### {name} — {stamp}\n\n`{command}`\n\n```json\n{text}\n```\n")
