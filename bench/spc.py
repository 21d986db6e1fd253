"""Synthetic-Persona-Chat (CC BY 4.0) for the memory benches: reading and vendoring.

The vendored subsets live in `bench/data/` (see its README for the attribution):

- `spc_valid_300.jsonl.gz`: the first 300 conversations of the validation split, the split
  the figures in docs/benchmarks.md are reported on;
- `spc_test_300.jsonl.gz`: the first 300 of the test split, the development split (the
  train split is not available here). Rules are tuned on it, never on the validation split.

Each line: {"row": 1-based data row, "personas": {"User 1": [...], "User 2": [...]},
"turns": [["User 1", "Hi!"], ...]}. Rebuild a subset from the CSV with

    python bench/spc.py CSV OUT.jsonl.gz --count 300
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DATA", "Conversation", "Speaker", "load", "read_csv", "speakers", "write"]

DATA = Path(__file__).resolve().parent / "data"
SPLITS = {"valid": DATA / "spc_valid_300.jsonl.gz", "dev": DATA / "spc_test_300.jsonl.gz"}
_LINE = re.compile(r"^(User [12]):\s*(.*)$")


@dataclass(frozen=True)
class Conversation:
    row: int
    personas: dict[str, list[str]]
    turns: list[tuple[str, str]]


@dataclass(frozen=True)
class Speaker:
    """One side of a conversation: its persona facts and its own lines, in order."""

    conversation: int
    name: str
    persona: list[str]
    lines: list[str]
    # The other side's lines (what the speaker heard; never theirs to be remembered).
    other_lines: list[str]


def read_csv(path: Path, count: int | None = None) -> list[Conversation]:
    """Parse the upstream CSV (`user 1 personas`, `user 2 personas`, the conversation)."""
    out: list[Conversation] = []
    with path.open(encoding="utf-8", newline="") as fh:
        for row, rec in enumerate(csv.DictReader(fh), start=1):
            if count is not None and len(out) >= count:
                break
            turns = []
            for line in rec["Best Generated Conversation"].splitlines():
                match = _LINE.match(line.strip())
                if match and match.group(2).strip():
                    turns.append((match.group(1), match.group(2).strip()))
            personas = {
                "User 1": _facts(rec["user 1 personas"]),
                "User 2": _facts(rec["user 2 personas"]),
            }
            out.append(Conversation(row, personas, turns))
    return out


def _facts(cell: str) -> list[str]:
    return [f.strip() for f in cell.splitlines() if f.strip()]


def write(conversations: list[Conversation], path: Path) -> None:
    lines = [
        json.dumps({"row": c.row, "personas": c.personas, "turns": c.turns}, ensure_ascii=False)
        for c in conversations
    ]
    # mtime=0: the same subset gives the same bytes.
    with path.open("wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as fh:
        fh.write(("\n".join(lines) + "\n").encode("utf-8"))


def load(split_or_path: str) -> list[Conversation]:
    """A vendored split (`valid`, `dev`) or a path to a JSONL.gz subset or upstream CSV."""
    path = SPLITS.get(split_or_path) or Path(split_or_path)
    if path.suffix == ".csv":
        return read_csv(path)
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            item = json.loads(line)
            turns = [(who, text) for who, text in item["turns"]]
            out.append(Conversation(item["row"], item["personas"], turns))
    return out


def speakers(conversations: list[Conversation]) -> list[Speaker]:
    """Both sides of every conversation that has persona facts and lines for them."""
    out = []
    for conv in conversations:
        for name, other in (("User 1", "User 2"), ("User 2", "User 1")):
            lines = [t for who, t in conv.turns if who == name]
            if conv.personas.get(name) and lines:
                heard = [t for who, t in conv.turns if who == other]
                out.append(Speaker(conv.row, name, conv.personas[name], lines, heard))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    conversations = read_csv(args.csv, args.count)
    write(conversations, args.out)
    print(f"{len(conversations)} conversations -> {args.out}")


if __name__ == "__main__":
    main()
