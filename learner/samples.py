"""Labelled JSONL samples shipped as package data (`learner/data/`), or a file of the
same shape in their place: the guard's and the PII scrubber's evaluations read them."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["sample_rows"]


def sample_rows(default: str, path: Path | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of each non-blank line of `path`, or of `learner/data/<default>`."""
    if path is None:
        text = resources.files("learner").joinpath(f"data/{default}").read_text("utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
