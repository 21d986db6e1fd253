"""What may be inside an adapter directory, checked without running or unpickling anything.

Only known files are accepted: PEFT's config and safetensors weights, the GGUF LoRA the
registry derives from them for llama.cpp (`adapter_model.gguf`), tokenizer files, JSON
metadata, the loss curve (`loss.json`, `loss.png`) and a README. Anything else (a pickle with no suffix, a script,
a sub-directory, a link) is refused by name. Each safetensors file is parsed: its header
must be sane and its data must be exactly as long as the header says, so a truncated or
padded file is refused before a model ever tries to load it; the GGUF LoRA is parsed too.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

from core.gguf_lora import GgufLoraError, check_gguf_lora

__all__ = [
    "ALLOWED_FILES",
    "GGUF_LORA_FILE",
    "PICKLE_SUFFIXES",
    "REQUIRED_FILES",
    "AdapterError",
    "AdapterVerificationError",
    "check_payload",
    "check_safetensors",
    "payload_files",
    "refuse_pickles",
]

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
# The llama.cpp copy of the LoRA: always written by the registry, never taken from a source.
GGUF_LORA_FILE = "adapter_model.gguf"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
# Files a LoRA adapter directory may hold besides `*.safetensors` and its manifest.
ALLOWED_FILES = frozenset(
    {
        "adapter_config.json",
        GGUF_LORA_FILE,
        "README.md",
        "loss.json",
        "loss.png",  # the training curve the console plots
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)
_TEXT_SUFFIXES = frozenset({".md", ".txt", ".jinja"})
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class AdapterError(ValueError):
    """An adapter operation cannot be done; nothing was changed."""


class AdapterVerificationError(AdapterError):
    """An adapter directory failed its checks (pickle file, hash mismatch, missing file...)."""


def refuse_pickles(path: Path, label: str) -> None:
    """Raise if `path` holds a pickle file; judged by name only, so none is ever opened."""
    pickles = sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise AdapterVerificationError(
            f"{label} contains pickle files ({', '.join(pickles)}); only safetensors "
            "adapters are accepted and pickle files are never loaded"
        )


def _tensor_bytes(name: str, entry: object, file: str) -> tuple[int, int]:
    """(begin, end) of one tensor's data, after checking its size matches dtype and shape."""
    if not isinstance(entry, dict):
        raise AdapterVerificationError(f"{file}: tensor {name!r} has no description")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if (
        dtype not in _DTYPE_BYTES
        or not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
    ):
        raise AdapterVerificationError(f"{file}: tensor {name!r} is malformed")
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise AdapterVerificationError(f"{file}: tensor {name!r} has the wrong size")
    return begin, end


def check_safetensors(path: Path) -> None:
    """Parse the header (8-byte length + JSON) and check the data is exactly what it lists."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise AdapterVerificationError(f"{path.name} is not a safetensors file")
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER, size - 8):
                raise AdapterVerificationError(f"{path.name} has an implausible header")
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as exc:
        if isinstance(exc, AdapterVerificationError):
            raise
        raise AdapterVerificationError(
            f"{path.name} is not a valid safetensors file: {exc}"
        ) from exc
    tensors = (
        {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    )
    if not tensors:
        raise AdapterVerificationError(f"{path.name} holds no tensors")
    spans = sorted(_tensor_bytes(name, entry, path.name) for name, entry in tensors.items())
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise AdapterVerificationError(f"{path.name}: tensor data overlaps or has gaps")
        covered = end
    data = size - 8 - length
    if data != covered:
        raise AdapterVerificationError(
            f"{path.name} is {'truncated' if data < covered else 'padded'}: its header lists "
            f"{covered} bytes of tensor data, the file holds {data}"
        )


def _check_allowed(path: Path, names: set[str]) -> None:
    unknown = sorted(n for n in names if n not in ALLOWED_FILES and not n.endswith(".safetensors"))
    if unknown:
        raise AdapterVerificationError(
            f"adapter {path.name} holds files an adapter does not need ({', '.join(unknown)}); "
            "only PEFT config and safetensors weights, tokenizer files, JSON metadata and a "
            "README are accepted"
        )
    for name in names:
        file = path / name
        try:
            if name.endswith(".json"):
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix in _TEXT_SUFFIXES:
                file.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise AdapterVerificationError(
                f"adapter {path.name}: {name} is unreadable: {exc}"
            ) from exc


def check_payload(path: Path, files: Iterable[str]) -> None:
    names = set(files)
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        raise AdapterVerificationError(
            f"adapter {path.name} is missing {', '.join(missing)} (a PEFT LoRA adapter needs both)"
        )
    _check_allowed(path, names)
    for name in names:
        if name.endswith(".safetensors"):
            check_safetensors(path / name)
    if GGUF_LORA_FILE in names:
        try:
            check_gguf_lora(path / GGUF_LORA_FILE)
        except GgufLoraError as exc:
            raise AdapterVerificationError(f"adapter {path.name}: {exc}") from exc


def payload_files(path: Path, skip: Iterable[str] = ()) -> list[str]:
    """Adapter files of a directory: regular files except those in `skip` (the manifest)."""
    skipped = set(skip)
    out = []
    for p in sorted(path.iterdir()):
        if p.name in skipped:
            continue
        if p.is_dir() or p.is_symlink():
            raise AdapterVerificationError(
                f"adapter {path.name} contains {p.name}, which is not a plain file"
            )
        out.append(p.name)
    return out
