"""An adapter's manifest (what it is, where it came from, a sha256 per file) and the
durable-write helpers the registry publishes with.

`verify_adapter_dir` is the one full check of a directory against its manifest: every listed
file present with its hash, nothing unlisted, and the payload checks of `adapter_files`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from learner.adapter_files import (
    GGUF_LORA_FILE,
    AdapterError,
    AdapterVerificationError,
    check_payload,
    payload_files,
    refuse_pickles,
)

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_TMP",
    "STATUSES",
    "AdapterManifest",
    "AdapterNotFoundError",
    "atomic_write",
    "code_version",
    "fsync_dir",
    "hash_file",
    "hash_model_weights",
    "manifest_bytes",
    "now_iso",
    "read_manifest",
    "verify_adapter_dir",
    "write_durable",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_TMP = ".manifest.json.tmp"
STATUSES = ("candidate", "active", "retired")


class AdapterNotFoundError(AdapterError):
    """No adapter with that id is published."""


@dataclass
class AdapterManifest:
    id: str
    parent_id: str | None = None
    iteration: int | None = None
    base_model_id: str = ""
    base_weights_sha256: str | None = None
    training_config: dict[str, Any] = field(default_factory=dict)
    training_dialogue_ids: list[str] = field(default_factory=list)
    training_set_hash: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    code_version: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    status: str = "candidate"
    status_reason: str | None = None
    source: str = "trained"
    gate: dict[str, Any] | None = None
    # name -> sha256 of every adapter file (everything in the directory but the manifest).
    files: dict[str, str] = field(default_factory=dict)
    format: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> AdapterManifest:
        if not isinstance(data, dict):
            raise AdapterVerificationError("manifest is not a JSON object")
        if not isinstance(data.get("id"), str) or not data["id"]:
            raise AdapterVerificationError("manifest has no id")
        files = data.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise AdapterVerificationError("manifest has no valid 'files' table of sha256 hashes")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise AdapterVerificationError(f"manifest is malformed: {exc}") from exc
        if manifest.status not in STATUSES:
            raise AdapterVerificationError(f"manifest has an unknown status {manifest.status!r}")
        return manifest


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_model_weights(model_dir: str | Path) -> str | None:
    """One sha256 over the base model's safetensors files (None for a hub id, not a dir)."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(hash_file(file).encode())
    return digest.hexdigest()


def code_version() -> dict[str, Any]:
    """The package version and, when run from a git checkout, the commit."""
    try:
        package = version("upc-chat")
    except PackageNotFoundError:
        package = "unknown"
    commit = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0:
            commit = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package": package, "git_commit": commit}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes, tmp_name: str | None = None) -> None:
    tmp = path.with_name(tmp_name or f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def verify_adapter_dir(path: Path, *, manifest: AdapterManifest | None = None) -> AdapterManifest:
    """All checks on one directory; returns its manifest. Never unpickles anything."""
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter directory {path} does not exist")
    refuse_pickles(path, f"adapter {path.name}")
    if manifest is None:
        manifest = read_manifest(path)
    present = set(payload_files(path, skip=(MANIFEST_FILE, MANIFEST_TMP)))
    listed = set(manifest.files)
    if GGUF_LORA_FILE not in listed:
        # A lazily written GGUF not committed yet (see learner.registry): ignored, never served.
        present.discard(GGUF_LORA_FILE)
    missing = sorted(listed - present)
    if missing:
        raise AdapterVerificationError(f"adapter {path.name} is missing {', '.join(missing)}")
    extra = sorted(present - listed)
    if extra:
        raise AdapterVerificationError(
            f"adapter {path.name} has files not in its manifest: {', '.join(extra)}"
        )
    for name, expected in sorted(manifest.files.items()):
        actual = hash_file(path / name)
        if actual != expected:
            raise AdapterVerificationError(
                f"adapter {path.name}: {name} does not match its manifest hash "
                f"(expected {expected[:12]}..., found {actual[:12]}...): changed or corrupted"
            )
    check_payload(path, listed)
    return manifest


def read_manifest(path: Path) -> AdapterManifest:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise AdapterVerificationError(f"adapter {path.name} has no {MANIFEST_FILE}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterVerificationError(
            f"adapter {path.name}: {MANIFEST_FILE} cannot be parsed: {exc}"
        ) from exc
    return AdapterManifest.from_dict(data)


def manifest_bytes(manifest: AdapterManifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")
