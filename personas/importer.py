"""Import background files (published ISCO-800 JSON, JSONL, CSV) as persona sets.

Import is all-or-nothing: every row is checked first, and any problem raises
`PersonaImportError` listing the rows and problems; only a clean file is written, through a
temporary file and an atomic rename.

Rows that repeat a user exactly (same id, name, background and split; other keys such as the
published `expand_id` may differ) are merged into one and counted: the published ISCO-800
test file lists each of its 200 users twice. Rows that share an id but differ in name,
background or split are an error naming the id and the rows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from personas.catalog import personas_dir
from personas.composer import SHIPPED_SET, dumps_jsonl
from personas.records import SPLITS, Persona, PersonaFormatError, Traits, word_count

__all__ = [
    "MAX_IMPORT_WORDS",
    "MIN_IMPORT_WORDS",
    "ImportResult",
    "ParsedFile",
    "PersonaImportError",
    "atomic_write_text",
    "delete_set",
    "import_file",
    "parse_file",
    "parse_personas",
    "save_set",
    "validate_set_name",
]

log = logging.getLogger(__name__)

MIN_IMPORT_WORDS = 10
MAX_IMPORT_WORDS = 1000
_MAX_LISTED = 20
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_PUBLISHED_KEYS = ("stage", "id", "name", "prompt")


class PersonaImportError(ValueError):
    """The file is malformed; `problems` names each bad row. Nothing was imported."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        listed = self.problems[:_MAX_LISTED]
        more = len(self.problems) - len(listed)
        lines = "\n".join(f"  - {p}" for p in listed)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"cannot import {source}; nothing was imported:\n{lines}{tail}")


@dataclass(frozen=True)
class ImportResult:
    name: str
    path: Path
    count: int
    splits: dict[str, int]
    merged_duplicates: int = 0  # rows dropped as exact repeats of an earlier row


@dataclass(frozen=True)
class ParsedFile:
    """The users of a checked file and how many exact duplicate rows were merged away."""

    personas: list[Persona]
    merged_duplicates: int = 0


def validate_set_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"set name {name!r} must be 1-64 characters of a-z, 0-9, '-' or '_', "
            "starting with a letter or digit"
        )
    if name == SHIPPED_SET:
        raise ValueError(f"{SHIPPED_SET!r} is the shipped set; choose another name")
    return name


def _default_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_")[:64]
    return name or "imported"


def _text_field(row: dict[str, Any], key: str, problems: list[str], where: str) -> str | None:
    value = row.get(key)
    if value is None:
        problems.append(f"{where}: missing {key!r}")
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: {key!r} must be text, got {type(value).__name__}")
        return None
    value = value.strip()
    if not value:
        problems.append(f"{where}: {key!r} is empty")
        return None
    return value


def _check_background(text: str, problems: list[str], where: str) -> None:
    words = word_count(text)
    if not MIN_IMPORT_WORDS <= words <= MAX_IMPORT_WORDS:
        problems.append(
            f"{where}: background has {words} words "
            f"(expected {MIN_IMPORT_WORDS} to {MAX_IMPORT_WORDS})"
        )


def _split(value: Any, problems: list[str], where: str, key: str) -> str | None:
    if not isinstance(value, str) or value.strip().lower() not in SPLITS:
        problems.append(f"{where}: {key} {value!r} is not one of {', '.join(SPLITS)}")
        return None
    return value.strip().lower()


Located = list[tuple[str, Persona]]  # (where in the file, the user it holds)


def _published_rows(items: list[Any], set_name: str, problems: list[str]) -> Located:
    personas: Located = []
    for number, item in enumerate(items, start=1):
        where = f"row {number}"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected an object, got {type(item).__name__}")
            continue
        if "id" in item:
            where += f" (id {item['id']!r})"
        missing = [k for k in _PUBLISHED_KEYS if k not in item]
        if missing:
            problems.append(f"{where}: missing {', '.join(repr(k) for k in missing)}")
            continue
        if not isinstance(item["id"], str | int) or isinstance(item["id"], bool):
            problems.append(f"{where}: 'id' must be a string or an integer")
            continue
        split = _split(item["stage"], problems, where, "stage")
        name = _text_field(item, "name", problems, where)
        background = _text_field(item, "prompt", problems, where)
        if background is not None:
            _check_background(background, problems, where)
        if split and name and background:
            persona = _persona(set_name, str(item["id"]), name, background, split, {})
            personas.append((f"row {number}", persona))
    return personas


def _record_rows(
    rows: Iterable[tuple[str, dict[str, Any]]],
    set_name: str,
    default_split: str,
    problems: list[str],
) -> Located:
    personas: Located = []
    for number, (where, row) in enumerate(rows, start=1):
        name = _text_field(row, "name", problems, where)
        background = _text_field(row, "background", problems, where)
        if background is not None:
            _check_background(background, problems, where)
        raw_split = row.get("split") or row.get("stage") or default_split
        split = _split(raw_split, problems, where, "split")
        local_id = str(row.get("id") or "").strip() or f"{number:04d}"
        extra = {k: row[k] for k in ("isco_code", "isco_title", "traits") if row.get(k)}
        if split and name and background:
            try:
                persona = _persona(set_name, local_id, name, background, split, extra)
                personas.append((where, persona))
            except PersonaFormatError as exc:
                problems.append(f"{where}: {exc}")
    return personas


def _persona(
    set_name: str, local_id: str, name: str, background: str, split: str, extra: dict[str, Any]
) -> Persona:
    traits = extra.get("traits")
    return Persona(
        id=f"{set_name}:{local_id}",
        name=name,
        background=background,
        split=split,
        isco_code=str(extra.get("isco_code", "")),
        isco_title=str(extra.get("isco_title", "")),
        source=set_name,
        traits=Traits.from_dict(traits) if traits else Traits(),
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise PersonaImportError(str(path), ["file not found"]) from exc
    except UnicodeDecodeError as exc:
        raise PersonaImportError(
            str(path), [f"not UTF-8 text (byte {exc.start}: {exc.reason})"]
        ) from exc
    except OSError as exc:
        raise PersonaImportError(str(path), [f"cannot read file: {exc}"]) from exc


def _merge_duplicates(located: Located, problems: list[str]) -> tuple[list[Persona], int]:
    """Keep the first of exactly repeated users; name ids whose rows disagree."""
    first: dict[str, tuple[str, Persona]] = {}
    conflicts: dict[str, list[str]] = {}
    kept: list[Persona] = []
    merged = 0
    for where, persona in located:
        if persona.id not in first:
            first[persona.id] = (where, persona)
            kept.append(persona)
        elif persona == first[persona.id][1]:
            merged += 1
        else:
            conflicts.setdefault(persona.id, [first[persona.id][0]]).append(where)
    for pid, wheres in conflicts.items():
        problems.append(
            f"id {pid!r} appears {len(wheres)} times with a different name, background or "
            f"split ({', '.join(wheres)})"
        )
    return kept, merged


def parse_personas(path: str | Path, set_name: str, default_split: str = "train") -> ParsedFile:
    """Parse and check a whole file, merging exact duplicate rows (and saying how many);
    raise `PersonaImportError` on any problem."""
    path = Path(path)
    source = str(path)
    if default_split not in SPLITS:
        raise ValueError(f"default split must be one of {', '.join(SPLITS)}")
    text = _read_text(path)
    problems: list[str] = []
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PersonaImportError(
                source, [f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
            ) from exc
        if not isinstance(data, list):
            raise PersonaImportError(source, ["expected a JSON list of backgrounds"])
        if data and all(isinstance(i, dict) and "prompt" in i for i in data[:1]):
            personas = _published_rows(data, set_name, problems)
        else:
            rows = []
            for n, item in enumerate(data, start=1):
                if isinstance(item, dict):
                    rows.append((f"row {n}", item))
                else:
                    problems.append(f"row {n}: expected an object, got {type(item).__name__}")
            personas = _record_rows(rows, set_name, default_split, problems)
    elif suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {n}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(item, dict):
                problems.append(f"line {n}: expected an object, got {type(item).__name__}")
                continue
            rows.append((f"line {n}", item))
        personas = _record_rows(rows, set_name, default_split, problems)
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in ("name", "background") if c not in header]
        if missing:
            raise PersonaImportError(
                source, [f"line 1: CSV header lacks column(s) {', '.join(missing)}"]
            )
        rows = []
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row:
                problems.append(f"{where}: more fields than the header has columns")
                continue
            if any(value is None for value in row.values()):
                problems.append(f"{where}: fewer fields than the header has columns")
                continue
            rows.append((where, dict(row)))
        personas = _record_rows(rows, set_name, default_split, problems)
    else:
        raise PersonaImportError(
            source, [f"unknown file type {suffix!r} (use .json, .jsonl, .csv)"]
        )
    unique, merged = _merge_duplicates(personas, problems)
    if not unique and not problems:
        problems.append("the file holds no backgrounds")
    if problems:
        raise PersonaImportError(source, problems)
    if merged:
        log.warning(
            "%s: merged %d duplicate rows (same id, name, background and split); %d users",
            source,
            merged,
            len(unique),
        )
    return ParsedFile(unique, merged)


def parse_file(path: str | Path, set_name: str, default_split: str = "train") -> list[Persona]:
    """The users of a checked file (see `parse_personas`)."""
    return parse_personas(path, set_name, default_split).personas


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_set(
    personas: Sequence[Persona],
    data_dir: Any,
    name: str,
    info: dict[str, Any] | None = None,
    replace: bool = False,
) -> Path:
    """Store a set as `<data_dir>/personas/<name>.jsonl` (+ `.meta.json`), atomically."""
    validate_set_name(name)
    directory = personas_dir(data_dir)
    path = directory / f"{name}.jsonl"
    if path.exists() and not replace:
        raise FileExistsError(f"persona set {name!r} already exists (use replace)")
    meta = {
        "name": name,
        "count": len(personas),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(info or {}),
    }
    atomic_write_text(directory / f"{name}.meta.json", json.dumps(meta, indent=2) + "\n")
    atomic_write_text(path, dumps_jsonl(personas))
    return path


def delete_set(data_dir: Any, name: str) -> bool:
    validate_set_name(name)
    directory = personas_dir(data_dir)
    existed = (directory / f"{name}.jsonl").exists()
    (directory / f"{name}.jsonl").unlink(missing_ok=True)
    (directory / f"{name}.meta.json").unlink(missing_ok=True)
    return existed


def import_file(
    path: str | Path,
    data_dir: Any,
    name: str | None = None,
    default_split: str = "train",
    replace: bool = False,
) -> ImportResult:
    """Parse, check and store a background file as a named set (all or nothing)."""
    path = Path(path)
    name = validate_set_name(name or _default_name(path))
    target = personas_dir(data_dir) / f"{name}.jsonl"
    if target.exists() and not replace:
        raise FileExistsError(f"persona set {name!r} already exists (pass --replace)")
    parsed = parse_personas(path, name, default_split)
    personas = parsed.personas
    info = {"imported_from": str(path.resolve()), "merged_duplicates": parsed.merged_duplicates}
    stored = save_set(personas, data_dir, name, info, replace=replace)
    splits = {s: sum(1 for p in personas if p.split == s) for s in SPLITS}
    return ImportResult(
        name=name,
        path=stored,
        count=len(personas),
        splits=splits,
        merged_duplicates=parsed.merged_duplicates,
    )
