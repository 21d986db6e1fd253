"""One writer per format; each appends a record at a time and keeps memory bounded."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from learner.export.paths import write_json
from learner.export.records import FORMAT_FILES, ExportRecord
from learner.export.schema import CONVERSATION_SCHEMA, MESSAGE_SCHEMA, message_rows

__all__ = ["Writer", "open_writers", "zip_dir"]

_ROW_GROUP = 20_000


class Writer(Protocol):
    def write(self, record: ExportRecord, data: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _JsonlWriter:
    def __init__(self, path: Path):
        self.path = path
        self._fh: IO[str] = path.open("w", encoding="utf-8")

    def write(self, record: ExportRecord, data: dict[str, Any]) -> None:
        self._fh.write(json.dumps(data, ensure_ascii=False))
        self._fh.write("\n")

    def close(self) -> None:
        self._fh.close()


class _ShareGptWriter:
    _ROLES: ClassVar[dict[str, str]] = {"user": "human", "assistant": "gpt", "system": "system"}

    def __init__(self, path: Path):
        self.path = path
        self._fh: IO[str] = path.open("w", encoding="utf-8")
        self._fh.write("[")
        self._first = True

    def write(self, record: ExportRecord, data: dict[str, Any]) -> None:
        item = {
            "id": record.meta.id,
            "conversations": [
                {"from": self._ROLES.get(r, r), "value": c} for r, c in record.messages
            ],
            "upc": data["upc"],
            "upc_turns": data["upc_turns"],
        }
        self._fh.write("\n" if self._first else ",\n")
        self._first = False
        self._fh.write(json.dumps(item, ensure_ascii=False))

    def close(self) -> None:
        self._fh.write("\n]\n")
        self._fh.close()


class _ParquetWriter:
    """Buffers one row group column-wise (lists are far lighter than per-row dicts)."""

    def __init__(self, path: Path, row_group: int = _ROW_GROUP):
        self.path = path
        self._writer = pq.ParquetWriter(path, MESSAGE_SCHEMA, compression="zstd")
        self._columns: dict[str, list[Any]] = {name: [] for name in MESSAGE_SCHEMA.names}
        self._rows = 0
        self._row_group = row_group

    def write(self, record: ExportRecord, data: dict[str, Any]) -> None:
        for row in message_rows(record):
            for name, value in row.items():
                self._columns[name].append(value)
            self._rows += 1
        if self._rows >= self._row_group:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            table = pa.Table.from_pydict(self._columns, schema=MESSAGE_SCHEMA)
            self._writer.write_table(table, row_group_size=self._row_group)
            self._columns = {name: [] for name in MESSAGE_SCHEMA.names}
            self._rows = 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


class _HfDatasetWriter:
    """Writes a `datasets.save_to_disk` directory directly, shard by shard.

    Rows are buffered for `batch_rows` conversations, then appended to the current Arrow
    shard; a shard is closed at `max_shard_bytes`. Memory stays bounded by one batch,
    whatever the export size (building a `Dataset` first and then `save_to_disk` would
    write everything twice and page the whole cache file in).
    """

    def __init__(self, path: Path, batch_rows: int = 1000, max_shard_bytes: int = 500 << 20):
        from datasets import Features

        self.path = path
        self._staging = path.with_name(f".{path.name}.partial")
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(parents=True)
        self._features = Features.from_arrow_schema(CONVERSATION_SCHEMA)
        self._batch_rows = batch_rows
        self._max_shard_bytes = max_shard_bytes
        self._rows: list[dict[str, Any]] = []
        self._shards: list[Path] = []
        self._writer: Any = None
        self._digest = hashlib.sha256()

    def write(self, record: ExportRecord, data: dict[str, Any]) -> None:
        self._rows.append(data)
        self._digest.update(str(data["upc"]["id"]).encode("utf-8"))
        if len(self._rows) >= self._batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        self._append(pa.Table.from_pylist(self._rows, schema=CONVERSATION_SCHEMA))
        self._rows = []

    def _append(self, table: pa.Table) -> None:
        from datasets.arrow_writer import ArrowWriter

        if self._writer is None:
            shard = self._staging / f"shard-{len(self._shards):05d}.arrow"
            self._shards.append(shard)
            self._writer = ArrowWriter(features=self._features, path=str(shard))
        self._writer.write_table(table)
        if self._writer._num_bytes >= self._max_shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        from datasets import DatasetInfo

        self._flush()
        if not self._shards:  # an empty export is still a loadable (empty) dataset
            self._append(CONVERSATION_SCHEMA.empty_table())
        self._close_shard()
        n = len(self._shards)
        files = []
        for i, shard in enumerate(self._shards):
            name = f"data-{i:05d}-of-{n:05d}.arrow"
            shard.rename(self._staging / name)
            files.append({"filename": name})
        state = {
            "_data_files": files,
            "_fingerprint": self._digest.hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        write_json(self._staging / "state.json", state)
        info = asdict(DatasetInfo(features=self._features))
        write_json(self._staging / "dataset_info.json", {k: info[k] for k in sorted(info)})
        shutil.rmtree(self.path, ignore_errors=True)
        self._staging.rename(self.path)


def zip_dir(source: Path, target: Path) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file() and not path.is_symlink():
                zf.write(path, arcname=f"{source.name}/{path.relative_to(source).as_posix()}")


_WRITERS: dict[str, Callable[[Path], Writer]] = {
    "jsonl": _JsonlWriter,
    "sharegpt": _ShareGptWriter,
    "parquet": _ParquetWriter,
    "hf": _HfDatasetWriter,
}


def open_writers(formats: Sequence[str], out_dir: Path) -> tuple[dict[str, Path], list[Writer]]:
    """One writer per requested format (in the fixed format order), with its output path."""
    files: dict[str, Path] = {}
    writers: list[Writer] = []
    for fmt in _WRITERS:
        if fmt in formats:
            files[fmt] = out_dir / FORMAT_FILES[fmt]
            writers.append(_WRITERS[fmt](files[fmt]))
    return files, writers
