"""The adapter registry: verified, atomically published LoRA adapters and the active choice.

Layout: `adapters/<id>/` holds the PEFT safetensors files plus `manifest.json` (with a sha256
per file); `adapters/ACTIVE` names the served adapter ("base" for the plain model). Adapters
are published by writing a hidden temp dir inside `adapters/`, fsyncing it and renaming it,
so a crash never leaves a listable half-adapter. Loading accepts safetensors only: a pickle
file is refused by its name, never opened.

Each adapter also gets `adapter_model.gguf`, the same LoRA for llama.cpp, converted by us
from the verified safetensors (a GGUF in a source directory is never copied) and covered by
the manifest's hashes like every other file:
- at publish, when the base model's config is known (passed in, or the adapter's recorded
  base directory). A trained adapter that cannot be converted is not published; an imported
  one is (torch can still serve it) and `gguf_path` reports why llama.cpp cannot;
- otherwise, and for adapters published before GGUF files existed, on the first
  `gguf_path(id, base_config=...)`: converted outside the adapter dir, renamed in, then the
  manifest is rewritten to list it. Until then (or after a crash between the two steps) an
  unlisted GGUF is ignored by `verify` and never served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.gguf_lora import (
    BaseConfig,
    GgufBaseUnknownError,
    GgufLoraError,
    check_gguf_lora,
    write_gguf_lora,
)
from core.types import BASE_ADAPTER
from learner.adapter_files import (
    GGUF_LORA_FILE,
    PICKLE_SUFFIXES,
    REQUIRED_FILES,
    AdapterError,
    AdapterVerificationError,
    check_payload,
    payload_files,
    refuse_pickles,
)
from learner.adapter_manifest import (
    MANIFEST_FILE,
    MANIFEST_TMP,
    AdapterManifest,
    AdapterNotFoundError,
    atomic_write,
    code_version,
    fsync_dir,
    hash_file,
    hash_model_weights,
    manifest_bytes,
    now_iso,
    read_manifest,
    verify_adapter_dir,
    write_durable,
)
from storage.adapter_models import AdapterActivation, AdapterRow
from storage.db import Database
from storage.models import utcnow

__all__ = [
    "ACTIVE_FILE",
    "GGUF_LORA_FILE",
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

ACTIVE_FILE = "ACTIVE"
_TMP_PREFIX = ".tmp-"
_LOCK_FILE = ".registry.lock"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_STALE_TMP_S = 3600.0
# Never taken from a source dir: the registry writes its own manifest and GGUF LoRA.
_NOT_COPIED = (MANIFEST_FILE, MANIFEST_TMP, GGUF_LORA_FILE)

PublishHook = Callable[[str], None]


@dataclass(frozen=True)
class ActivationRecord:
    adapter_id: str
    previous_id: str
    action: str
    reason: str | None
    created_at: datetime


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
        return read_manifest(path)

    def list(self) -> list[AdapterManifest]:
        """Published adapters, oldest first; temp dirs and unreadable ones are skipped."""
        out = []
        for entry in sorted(self.adapters_dir.iterdir()):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                out.append(read_manifest(entry))
            except AdapterVerificationError as exc:
                log.warning("skipping adapter dir %s: %s", entry.name, exc)
        return sorted(out, key=lambda m: (m.created_at, m.id))

    def newest_candidates(self, limit: int = 2) -> list[str]:
        """The `limit` newest adapters waiting as candidates: what a gate or an operator
        is likeliest to activate next (a server may hold them ahead of use)."""
        candidates = [m.id for m in self.list() if m.status == "candidate"]
        return candidates[-limit:] if limit > 0 else []

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
        base_config: BaseConfig | None = None,
        hook: PublishHook | None = None,
    ) -> AdapterManifest:
        """Copy `source_dir`'s adapter files in as `manifest.id`, atomically, with a GGUF LoRA
        converted from them (`base_config`: the base model's dir, config or GGUF).

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
        names = payload_files(source, skip=_NOT_COPIED)
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
            gguf_hash = _convert_at_publish(tmp, manifest, base_config)
            if gguf_hash is not None:
                files[GGUF_LORA_FILE] = gguf_hash
            _call(hook, "copied")
            manifest = dataclasses.replace(
                manifest, files=files, created_at=manifest.created_at or now_iso()
            )
            write_durable(tmp / MANIFEST_FILE, manifest_bytes(manifest))
            _call(hook, "manifest")
            verify_adapter_dir(tmp, manifest=manifest)
            fsync_dir(tmp)
            _call(hook, "synced")
            os.rename(tmp, self.path(manifest.id))
            fsync_dir(self.adapters_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _call(hook, "renamed")
        self._index(manifest)
        log.info("published adapter %s (%d files)", manifest.id, len(files))
        return manifest

    def import_dir(
        self,
        source_dir: str | Path,
        *,
        adapter_id: str | None = None,
        base_config: BaseConfig | None = None,
    ) -> AdapterManifest:
        """Bring in an adapter trained elsewhere, after the same checks; it becomes a candidate."""
        source = Path(source_dir)
        if not source.is_dir():
            raise AdapterNotFoundError(f"{source} is not a directory")
        refuse_pickles(source, str(source))
        if (source / MANIFEST_FILE).exists():
            manifest = verify_adapter_dir(source)
        else:
            names = payload_files(source, skip=_NOT_COPIED)
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
            created_at=now_iso(),
        )
        return self.publish(source, manifest, base_config=base_config)

    def gguf_path(self, adapter_id: str, *, base_config: BaseConfig | None = None) -> Path:
        """The verified GGUF LoRA of `adapter_id` for llama.cpp, converted now if it has none.

        `base_config` is the model llama.cpp serves (its GGUF, or `base_shape` of it): the
        adapter must fit it. Raises AdapterError when the adapter fails verification, does
        not fit that model or cannot be converted.
        """
        with self._locked():
            manifest = self.verify(adapter_id)
            path = self.path(adapter_id)
            if GGUF_LORA_FILE in manifest.files:
                if base_config is not None:
                    try:
                        check_gguf_lora(path / GGUF_LORA_FILE, base=base_config)
                    except GgufLoraError as exc:
                        raise AdapterError(f"adapter {adapter_id}: {exc}") from exc
                return path / GGUF_LORA_FILE
            # Converted outside the adapter dir so no reader ever sees a half file in it.
            tmp = self.adapters_dir / f"{_TMP_PREFIX}{adapter_id}-gguf-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                info = write_gguf_lora(path, tmp / GGUF_LORA_FILE, base_config=base_config)
                os.replace(tmp / GGUF_LORA_FILE, path / GGUF_LORA_FILE)
                fsync_dir(path)
            except GgufLoraError as exc:
                raise AdapterError(f"adapter {adapter_id} has no GGUF LoRA: {exc}") from exc
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            manifest = dataclasses.replace(
                manifest, files={**manifest.files, GGUF_LORA_FILE: info.sha256}
            )
            atomic_write(path / MANIFEST_FILE, manifest_bytes(manifest), MANIFEST_TMP)
            log.info("adapter %s: wrote its GGUF LoRA for llama.cpp", adapter_id)
            return self.verified_path(adapter_id) / GGUF_LORA_FILE

    def update_manifest(self, adapter_id: str, **changes: Any) -> AdapterManifest:
        """Rewrite fields of a published manifest atomically (the files' hashes never change)."""
        with self._locked():
            if "files" in changes or "id" in changes:
                raise AdapterError("an adapter's id and files cannot change after publishing")
            path = self.path(adapter_id)
            manifest = dataclasses.replace(self.get(adapter_id), **changes)
            atomic_write(path / MANIFEST_FILE, manifest_bytes(manifest), MANIFEST_TMP)
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
            atomic_write(self.adapters_dir / ACTIVE_FILE, f"{adapter_id}\n".encode())
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


def _convert_at_publish(
    adapter_dir: Path, manifest: AdapterManifest, base_config: BaseConfig | None
) -> str | None:
    """Write the GGUF LoRA into a publish temp dir; its sha256, or None to convert later."""
    try:
        return write_gguf_lora(
            adapter_dir, adapter_dir / GGUF_LORA_FILE, base_config=base_config
        ).sha256
    except GgufBaseUnknownError as exc:
        log.warning("adapter %s: GGUF LoRA left for later: %s", manifest.id, exc)
    except GgufLoraError as exc:
        if manifest.source == "trained":
            raise AdapterError(
                f"adapter {manifest.id} cannot be converted for llama.cpp, not published: {exc}"
            ) from exc
        log.warning("adapter %s: llama.cpp cannot serve it: %s", manifest.id, exc)
    return None


def _call(hook: PublishHook | None, stage: str) -> None:
    if hook is not None:
        hook(stage)
