"""The export stage: read, filter, scrub and write the selected dialogues into one directory.

`export()` streams conversations out of the database page by page and writes every requested
format incrementally, so memory stays bounded however large the export.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

from learner.export.paths import MANIFEST, check_export_id, new_export_id, write_json
from learner.export.reader import DialogueReader
from learner.export.records import (
    FORMATS,
    HF_ZIP,
    SALT_ENV,
    BotAttempt,
    CriticScores,
    ExportCancelled,
    ExportError,
    ExportFilters,
    ExportOptions,
    ExportProgress,
    ExportRecord,
    ExportResult,
    iso,
)
from learner.export.writers import Writer, open_writers, zip_dir
from learner.pii import PiiScrubber, ScrubCounts, UserTerms
from storage.db import Database

__all__ = ["SCHEMA_VERSION", "export"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def export(
    db: Database,
    exports_dir: Path,
    options: ExportOptions | None = None,
    *,
    progress: Callable[[ExportProgress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    env: Mapping[str, str] | None = None,
    runs_dir: Path | None = None,
) -> ExportResult:
    """Export the selected dialogues into `exports_dir/<export_id>/` in the requested formats.

    `progress` is called after every page of conversations; `cancel()` returning True stops
    the export and removes its directory. The salt that hashes user ids comes from
    `$UPC_EXPORT_SALT` or is generated; it is returned (and written to `runs_dir` when given)
    but never written into the export directory.
    """
    options = options or ExportOptions()
    formats = tuple(dict.fromkeys(options.formats))
    if not formats or set(formats) - set(FORMATS):
        raise ExportError(f"formats must be a non-empty subset of {FORMATS}, got {options.formats}")
    options.filters.validate()
    export_id = options.export_id or new_export_id()
    check_export_id(export_id)
    env = os.environ if env is None else env
    salt = env.get(SALT_ENV, "")
    salt_source = "env" if salt else "generated"
    salt = salt or secrets.token_hex(16)

    reader = DialogueReader(db, options.filters, salt, options.chunk_size)
    reader.resolve_users()
    exports_dir = Path(exports_dir)
    exports_dir.mkdir(parents=True, exist_ok=True)
    out_dir = exports_dir / export_id
    try:
        out_dir.mkdir()
    except FileExistsError as exc:
        raise ExportError(f"export {export_id} already exists") from exc

    started = time.monotonic()
    try:
        result = _run(reader, options, formats, out_dir, progress, cancel)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    result.salt, result.salt_source = salt, salt_source
    result.duration_s = time.monotonic() - started
    write_json(out_dir / MANIFEST, _manifest(result, options, formats))
    if runs_dir is not None:
        record_dir = Path(runs_dir) / "exports"
        record_dir.mkdir(parents=True, exist_ok=True)
        # Private (runs_dir, never shared): which users it holds, for `upc erase`.
        users = sorted(result.user_hashes)
        write_json(
            record_dir / f"{export_id}.json",
            {**result.summary(), "salt": salt, "user_hashes": users},
        )
    log.info(
        "export %s: %d conversations, %d messages, %d PII replacements",
        export_id,
        result.conversations,
        result.messages,
        result.scrubbed.total,
    )
    return result


@dataclass
class _Tally:
    """What the export has visited and written so far."""

    total: int = 0  # estimated messages to visit
    visited: int = 0
    conversations: int = 0
    messages: int = 0
    real: int = 0
    synthetic: int = 0
    skipped_empty: int = 0
    users: set[str] = field(default_factory=set)  # salted hashes of the real users written
    progress: Callable[[ExportProgress], None] | None = None

    def report(self, phase: str) -> None:
        if self.progress is not None:
            self.progress(ExportProgress(phase, self.conversations, self.messages, self.total))

    def written(self, record: ExportRecord) -> None:
        self.conversations += 1
        self.messages += len(record.messages)
        if record.meta.source == "real":
            self.real += 1
            self.users.add(record.meta.user)
        else:
            self.synthetic += 1


def _run(
    reader: DialogueReader,
    options: ExportOptions,
    formats: tuple[str, ...],
    out_dir: Path,
    progress: Callable[[ExportProgress], None] | None,
    cancel: Callable[[], bool] | None,
) -> ExportResult:
    files, writers = open_writers(formats, out_dir)
    tally = _Tally(progress=progress)
    report = tally.report
    report("counting")
    tally.total, skipped_opted_out = reader.count()
    scrubber = PiiScrubber()
    counts = ScrubCounts()
    try:
        for record, terms in chain.from_iterable(_sources(reader)):
            tally.visited += 1
            if record.meta.n_bot_turns == 0:
                tally.skipped_empty += 1
            elif _selected(record, reader.filters):
                if options.scrub:
                    _scrub_record(record, scrubber, counts, terms)
                _write(record, writers)
                tally.written(record)
            if tally.visited % reader.chunk == 0:
                if cancel is not None and cancel():
                    raise ExportCancelled("export cancelled")
                report("writing")
    finally:
        for writer in writers:
            writer.close()
    report("writing")
    if "hf" in formats and options.zip_hf_dataset:
        report("dataset")
        files["hf_zip"] = out_dir / HF_ZIP
        zip_dir(files["hf"], files["hf_zip"])
    report("done")
    return ExportResult(
        export_id=out_dir.name,
        directory=out_dir,
        files=files,
        conversations=tally.conversations,
        messages=tally.messages,
        real=tally.real,
        synthetic=tally.synthetic,
        skipped_opted_out=skipped_opted_out,
        skipped_empty=tally.skipped_empty,
        scrubbed=counts,
        scrub_enabled=options.scrub,
        salt_source="",
        duration_s=0.0,
        user_hashes=frozenset(tally.users),
    )


def _sources(reader: DialogueReader) -> list[Iterator[tuple[ExportRecord, UserTerms | None]]]:
    """Real conversations first, then synthetic dialogues, as the filters ask."""
    sources = []
    if reader.want_real:
        sources.append(reader.iter_real())
    if reader.want_synthetic:
        sources.append(reader.iter_synthetic())
    return sources


def _write(record: ExportRecord, writers: Sequence[Writer]) -> None:
    data = record.to_json()  # once for every format
    for writer in writers:
        writer.write(record, data)


def _manifest(
    result: ExportResult, options: ExportOptions, formats: tuple[str, ...]
) -> dict[str, Any]:
    f = options.filters
    filters = asdict(f)
    filters["since"] = iso(f.since) or None
    filters["until"] = iso(f.until) or None
    # Usernames are identifying: the manifest records only how many users were selected.
    filters["users"] = len(f.users)
    summary = result.summary()
    summary.pop("directory")
    summary["files"] = {k: v.name for k, v in result.files.items()}
    return {
        **summary,
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "formats": list(formats),
        "filters": filters,
    }


def _selected(record: ExportRecord, f: ExportFilters) -> bool:
    meta = record.meta
    if not (meta.source in f.sources or ("regenerated" in f.sources and meta.regenerated)):
        return False
    if f.adapters and not set(f.adapters) & set(meta.adapter_ids):
        return False
    if f.min_score is not None or f.max_score is not None:
        if meta.mean_score <= 0:
            return False
        if f.min_score is not None and meta.mean_score < f.min_score:
            return False
        if f.max_score is not None and meta.mean_score > f.max_score:
            return False
    if f.feedback == "liked":
        return meta.likes > 0
    if f.feedback == "disliked":
        return meta.dislikes > 0
    if f.feedback == "none":
        return meta.likes == 0 and meta.dislikes == 0
    return True


def _scrub_record(
    record: ExportRecord, scrubber: PiiScrubber, counts: ScrubCounts, terms: UserTerms | None
) -> None:
    def fn(text: str) -> str:
        return scrubber.scrub(text, counts, terms)

    # A critique repeated across fields (final score == last attempt's) is scrubbed and
    # counted once.
    memo: dict[CriticScores, CriticScores] = {}

    def critic(c: CriticScores) -> CriticScores:
        if c not in memo:
            memo[c] = c.scrubbed(fn)
        return memo[c]

    record.meta.title = fn(record.meta.title)
    record.messages = [(role, fn(content)) for role, content in record.messages]
    for i, turn in enumerate(record.turns):
        turn.critic = critic(turn.critic)
        turn.first_critic = critic(turn.first_critic)
        turn.feedback_reason = fn(turn.feedback_reason)
        last = len(turn.regeneration_history) - 1
        # The final version repeats the message: reuse its scrubbed text (counted once).
        turn.regeneration_history = [
            BotAttempt(
                record.messages[i][1] if n == last else fn(a.content),
                a.origin,
                critic(a.critic),
                a.feedback,
            )
            for n, a in enumerate(turn.regeneration_history)
        ]
