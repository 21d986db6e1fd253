"""The adapter registry: verified, atomically published LoRA adapters and the active choice.

Layout: `adapters/<id>/` holds the PEFT safetensors files plus `manifest.json` (with a sha256
per file); `adapters/ACTIVE` names the served adapter ("base" for the plain model). Adapters
are published by writing a hidden temp dir inside `adapters/`, fsyncing it and renaming it,
so a crash never leaves a listable half-adapter. Loading accepts safetensors only: a pickle
file is refused by its name, never opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.types import BASE_ADAPTER
from learner.adapter_files import (
    PICKLE_SUFFIXES,
    REQUIRED_FILES,
    AdapterError,
    AdapterVerificationError,
    check_payload,
    payload_files,
    refuse_pickles,
)
from storage.adapter_models import AdapterActivation, AdapterRow
from storage.db import Database
from storage.models import utcnow

__all__ = [
    "ACTIVE_FILE",
    "MANIFEST_FILE",
    "PICKLE_SUFFIXES",
    "REQUIRED_FILES",
    "ActivationRecord",
    "AdapterError",
    "AdapterManifest",
    "AdapterNotFoundError",
    "AdapterRegistry",
    "AdapterVerificationError",
    "code_version",
    "hash_file",
    "hash_model_weights",
]

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
ACTIVE_FILE = "ACTIVE"
STATUSES = ("candidate", "active", "retired")
_TMP_PREFIX = ".tmp-"
_MANIFEST_TMP = ".manifest.json.tmp"
_LOCK_FILE = ".registry.lock"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_STALE_TMP_S = 3600.0

PublishHook = Callable[[str], None]


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


@dataclass(frozen=True)
class ActivationRecord:
    adapter_id: str
    previous_id: str
    action: str
    reason: str | None
    created_at: datetime


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


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write(path: Path, data: bytes, tmp_name: str | None = None) -> None:
    tmp = path.with_name(tmp_name or f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def verify_adapter_dir(path: Path, *, manifest: AdapterManifest | None = None) -> AdapterManifest:
    """All checks on one directory; returns its manifest. Never unpickles anything."""
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter directory {path} does not exist")
    refuse_pickles(path, f"adapter {path.name}")
    if manifest is None:
        manifest = _read_manifest(path)
    present = set(payload_files(path, skip=(MANIFEST_FILE, _MANIFEST_TMP)))
    listed = set(manifest.files)
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


def _read_manifest(path: Path) -> AdapterManifest:
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


def _check_id(adapter_id: str) -> None:
    if adapter_id == BASE_ADAPTER or not _ID_RE.match(adapter_id or ""):
        raise AdapterError(
            f"invalid adapter id {adapter_id!r}: use 1-64 letters, digits, '.', '_' or '-', "
            f"not {BASE_ADAPTER!r}"
        )


class AdapterRegistry:
    """Publishes, verifies, lists and activates adapters under `adapters_dir`."""

    def __init__(self, adapters_dir: str | Path, db: Database):
        self.adapters_dir = Path(adapters_dir)
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.db = db
        # Activation and manifest rewrites are serialized across processes (the app's
        # watcher may roll back while `upc adapters activate` is still writing).
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self._cleanup_stale()

    # ----------------------------------------------------------------- reading
    def path(self, adapter_id: str) -> Path:
        _check_id(adapter_id)
        return self.adapters_dir / adapter_id

    def exists(self, adapter_id: str) -> bool:
        return adapter_id != BASE_ADAPTER and (self.path(adapter_id) / MANIFEST_FILE).is_file()

    def get(self, adapter_id: str) -> AdapterManifest:
        path = self.path(adapter_id)
        if not path.is_dir():
            raise AdapterNotFoundError(f"no adapter {adapter_id!r} in {self.adapters_dir}")
        return _read_manifest(path)

    def list(self) -> list[AdapterManifest]:
        """Published adapters, oldest first; temp dirs and unreadable ones are skipped."""
        out = []
        for entry in sorted(self.adapters_dir.iterdir()):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                out.append(_read_manifest(entry))
            except AdapterVerificationError as exc:
                log.warning("skipping adapter dir %s: %s", entry.name, exc)
        return sorted(out, key=lambda m: (m.created_at, m.id))

    def verify(self, adapter_id: str) -> AdapterManifest:
        """Full check of a published adapter; raises AdapterVerificationError with the cause."""
        path = self.path(adapter_id)
        manifest = verify_adapter_dir(path)
        if manifest.id != adapter_id:
            raise AdapterVerificationError(
                f"adapter dir {adapter_id} holds a manifest for {manifest.id!r}"
            )
        return manifest

    def verified_path(self, adapter_id: str) -> Path:
        """The directory to load, after `verify` (what the model runtime should call)."""
        self.verify(adapter_id)
        return self.path(adapter_id)

    # ---------------------------------------------------------------- publishing
    def publish(
        self,
        source_dir: str | Path,
        manifest: AdapterManifest,
        *,
        hook: PublishHook | None = None,
    ) -> AdapterManifest:
        """Copy `source_dir`'s adapter files in as `manifest.id`, atomically.

        `hook(stage)` is called between steps ("copied", "manifest", "synced", "renamed");
        tests use it to inject a crash.
        """
        source = Path(source_dir)
        _check_id(manifest.id)
        if self.path(manifest.id).exists():
            raise AdapterError(f"adapter {manifest.id!r} already exists")
        if not source.is_dir():
            raise AdapterNotFoundError(f"{source} is not a directory")
        refuse_pickles(source, str(source))
        names = payload_files(source, skip=(MANIFEST_FILE, _MANIFEST_TMP))
        check_payload(source, names)
        tmp = self.adapters_dir / f"{_TMP_PREFIX}{manifest.id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files: dict[str, str] = {}
            for name in names:
                shutil.copyfile(source / name, tmp / name)
                with (tmp / name).open("rb+") as fh:
                    os.fsync(fh.fileno())
                files[name] = hash_file(tmp / name)
            _call(hook, "copied")
            manifest = dataclasses.replace(
                manifest, files=files, created_at=manifest.created_at or _now_iso()
            )
            _write_durable(tmp / MANIFEST_FILE, _manifest_bytes(manifest))
            _call(hook, "manifest")
            verify_adapter_dir(tmp, manifest=manifest)
            _fsync_dir(tmp)
            _call(hook, "synced")
            os.rename(tmp, self.path(manifest.id))
            _fsync_dir(self.adapters_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _call(hook, "renamed")
        self._index(manifest)
        log.info("published adapter %s (%d files)", manifest.id, len(files))
        return manifest

    def import_dir(
        self, source_dir: str | Path, *, adapter_id: str | None = None
    ) -> AdapterManifest:
        """Bring in an adapter trained elsewhere, after the same checks; it becomes a candidate."""
        source = Path(source_dir)
        if not source.is_dir():
            raise AdapterNotFoundError(f"{source} is not a directory")
        refuse_pickles(source, str(source))
        if (source / MANIFEST_FILE).exists():
            manifest = verify_adapter_dir(source)
        else:
            names = payload_files(source, skip=(MANIFEST_FILE, _MANIFEST_TMP))
            check_payload(source, names)
            config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
            weights_hash = hash_file(source / "adapter_model.safetensors")
            manifest = AdapterManifest(
                id=f"import-{weights_hash[:12]}",
                base_model_id=str(config.get("base_model_name_or_path") or ""),
                training_config={"peft": config},
                code_version={"package": "unknown", "git_commit": None},
            )
        new_id = adapter_id or manifest.id
        manifest = dataclasses.replace(
            manifest,
            id=new_id,
            status="candidate",
            status_reason=f"imported from {source.resolve()}",
            source="imported",
            created_at=_now_iso(),
        )
        return self.publish(source, manifest)

    def update_manifest(self, adapter_id: str, **changes: Any) -> AdapterManifest:
        """Rewrite fields of a published manifest atomically (the files' hashes never change)."""
        with self._locked():
            if "files" in changes or "id" in changes:
                raise AdapterError("an adapter's id and files cannot change after publishing")
            path = self.path(adapter_id)
            manifest = dataclasses.replace(self.get(adapter_id), **changes)
            _atomic_write(path / MANIFEST_FILE, _manifest_bytes(manifest), _MANIFEST_TMP)
            self._index(manifest)
            return manifest

    # ---------------------------------------------------------------- activation
    def active_id(self) -> str:
        """The served adapter id, or "base"; persisted in `adapters/ACTIVE`."""
        file = self.adapters_dir / ACTIVE_FILE
        try:
            value = file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            history = self.history()
            return history[-1].adapter_id if history else BASE_ADAPTER
        return value or BASE_ADAPTER

    def activate(
        self, adapter_id: str, *, reason: str | None = None, action: str = "activate"
    ) -> str:
        """Make `adapter_id` (or "base") the served adapter; refused if it fails verification."""
        with self._locked():
            previous = self.active_id()
            if adapter_id != BASE_ADAPTER:
                manifest = self.verify(adapter_id)
                if manifest.status == "retired":
                    why = manifest.status_reason or "no reason"
                    raise AdapterError(
                        f"adapter {adapter_id} is retired ({why}); it cannot be activated"
                    )
            if adapter_id == previous:
                return adapter_id
            _atomic_write(self.adapters_dir / ACTIVE_FILE, f"{adapter_id}\n".encode())
            with self.db.session() as session:
                session.add(
                    AdapterActivation(
                        adapter_id=adapter_id, previous_id=previous, action=action, reason=reason
                    )
                )
            if previous != BASE_ADAPTER and self.exists(previous):
                old = self.get(previous)
                if old.status == "active":
                    self.update_manifest(
                        previous, status="candidate", status_reason=f"replaced by {adapter_id}"
                    )
            if adapter_id != BASE_ADAPTER:
                self.update_manifest(
                    adapter_id, status="active", status_reason=reason or f"{action} by operator"
                )
            log.info("active adapter: %s -> %s (%s)", previous, adapter_id, action)
            return adapter_id

    def rollback(self, *, reason: str | None = None) -> str:
        """Go back to the adapter that was active before the current one."""
        with self._locked():
            stack = self._activation_stack()
            current = stack.pop()
            while stack:
                target = stack.pop()
                if target == current:
                    continue
                if target == BASE_ADAPTER:
                    return self.activate(
                        BASE_ADAPTER, reason=reason or "rollback", action="rollback"
                    )
                try:
                    manifest = self.verify(target)
                except AdapterError as exc:
                    log.warning("rollback skips %s: %s", target, exc)
                    continue
                if manifest.status == "retired":
                    continue
                return self.activate(target, reason=reason or "rollback", action="rollback")
            raise AdapterError("nothing to roll back to: no earlier active adapter in the history")

    def revert_failed(self, adapter_id: str, serving: str, error: str) -> bool:
        """The app could not load `adapter_id`: point ACTIVE back at what it still serves.

        Only if ACTIVE still names that adapter (another activation may have come since).
        """
        with self._locked():
            if self.active_id() != adapter_id or serving == adapter_id:
                return False
            reason = f"{adapter_id} failed to load: {error[:300]}"
            self.activate(serving, reason=reason, action="rollback")
            if self.exists(adapter_id):
                self.update_manifest(adapter_id, status_reason=f"failed to load: {error[:300]}")
            log.error("ACTIVE rolled back to %s: %s", serving, reason)
            return True

    def retire(self, adapter_id: str, reason: str = "retired by operator") -> AdapterManifest:
        with self._locked():
            if self.active_id() == adapter_id:
                raise AdapterError(
                    f"adapter {adapter_id} is active; activate another one or roll back first"
                )
            self.get(adapter_id)
            return self.update_manifest(adapter_id, status="retired", status_reason=reason)

    def history(self) -> list[ActivationRecord]:
        with self.db.session() as session:
            rows = session.scalars(select(AdapterActivation).order_by(AdapterActivation.id)).all()
            return [
                ActivationRecord(r.adapter_id, r.previous_id, r.action, r.reason, r.created_at)
                for r in rows
            ]

    # ---------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive, re-entrant lock on the registry, shared with other processes."""
        with self._lock:
            if self._lock_depth == 0:
                fd = os.open(self.adapters_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                    os.close(self._lock_fd)
                    self._lock_fd = None

    def _activation_stack(self) -> list[str]:
        stack = [BASE_ADAPTER]
        for record in self.history():
            if record.action == "rollback":
                if len(stack) > 1:
                    stack.pop()
                if stack[-1] != record.adapter_id:
                    stack.append(record.adapter_id)
            else:
                stack.append(record.adapter_id)
        current = self.active_id()
        if stack[-1] != current:
            stack.append(current)
        return stack

    def _index(self, manifest: AdapterManifest) -> None:
        with self.db.session() as session:
            row = session.get(AdapterRow, manifest.id) or AdapterRow(id=manifest.id)
            row.parent_id = manifest.parent_id
            row.iteration = manifest.iteration
            row.base_model_id = manifest.base_model_id
            row.status = manifest.status
            row.reason = manifest.status_reason
            row.source = manifest.source
            row.metrics = manifest.metrics
            row.updated_at = utcnow()
            session.add(row)

    def _cleanup_stale(self) -> None:
        """Remove temp dirs left by a crashed publish (old enough not to be in progress)."""
        now = time.time()
        for entry in self.adapters_dir.iterdir():
            if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > _STALE_TMP_S:
                        shutil.rmtree(entry)
                        log.info("removed stale temp dir %s", entry.name)


def _manifest_bytes(manifest: AdapterManifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")


def _call(hook: PublishHook | None, stage: str) -> None:
    if hook is not None:
        hook(stage)
