"""Where an export lives: ids, the one safe download lookup, manifests.

Files are written only inside `exports_dir/<export_id>/`; `resolve_export_file` is the one
safe way to map a download request to a file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner.export.records import ExportPathError

__all__ = [
    "MANIFEST",
    "check_export_id",
    "list_exports",
    "new_export_id",
    "resolve_export_file",
    "write_json",
]

MANIFEST = "manifest.json"

_EXPORT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,100}(?:\.[A-Za-z0-9]{1,10}){0,3}")


def new_export_id() -> str:
    return datetime.now(UTC).strftime("exp-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def check_export_id(export_id: str) -> None:
    if not isinstance(export_id, str) or not _EXPORT_ID.fullmatch(export_id):
        raise ExportPathError("invalid export id")


def resolve_export_file(exports_dir: Path, export_id: str, filename: str) -> Path:
    """The regular file `filename` of export `export_id`, or `ExportPathError`.

    Both parts must match strict patterns (no separators, no `..`, no `%`, no NUL), no part
    of the path may be a symlink, and the resolved path must lie inside the export dir.
    """
    check_export_id(export_id)
    if not isinstance(filename, str) or not _FILENAME.fullmatch(filename) or ".." in filename:
        raise ExportPathError("invalid file name")
    base = Path(exports_dir).resolve()
    export_dir = base / export_id
    candidate = export_dir / filename
    try:
        if export_dir.is_symlink() or candidate.is_symlink():
            raise ExportPathError("invalid file name")
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ExportPathError("no such export file") from exc
    if resolved.parent != export_dir.resolve() or not resolved.is_relative_to(base):
        raise ExportPathError("invalid file name")
    if not resolved.is_file():
        raise ExportPathError("no such export file")
    return resolved


def list_exports(exports_dir: Path) -> list[dict[str, Any]]:
    """The manifests of the finished exports, newest first (for the console's list)."""
    base = Path(exports_dir)
    if not base.is_dir():
        return []
    manifests = []
    for child in base.iterdir():
        if child.is_symlink() or not child.is_dir() or not _EXPORT_ID.fullmatch(child.name):
            continue
        path = child / MANIFEST
        try:
            manifests.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(manifests, key=lambda m: str(m.get("created_at", "")), reverse=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written whole or not at all (a reader never sees half a manifest)."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
