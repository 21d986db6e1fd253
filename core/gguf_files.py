"""Checks of GGUF files before llama.cpp loads them, so a bad file gets a clear error.

llama.cpp refuses a corrupt model or a LoRA that doesn't fit its base, but only with a
generic "failed to init". These checks read the GGUF headers with the `gguf` package and
name what is wrong: not a GGUF, cut short, not a model or not a LoRA, or a LoRA tensor
whose name or shape has no match in the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GgufError", "GgufModelInfo", "check_lora", "read_model"]

_LORA_SUFFIXES = (".lora_a", ".lora_b")


class GgufError(ValueError):
    """A GGUF file that llama.cpp could not use; the message says why."""


@dataclass(frozen=True)
class GgufModelInfo:
    path: Path
    architecture: str
    context_length: int | None
    # Tensor name -> shape in ggml order (the input dimension first).
    shapes: dict[str, tuple[int, ...]]


def _open(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise GgufError(f"{path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise GgufError(
            f"{path.name} is not a readable GGUF file, it may be corrupt or cut short ({exc})"
        ) from exc
    size = path.stat().st_size
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise GgufError(
                f"{path.name} is cut short: tensor {tensor.name} ends past the end of the file"
            )
    return reader


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_model(path: str | Path) -> GgufModelInfo:
    """The model's architecture and tensor shapes; GgufError if it can't be a served model."""
    path = Path(path)
    reader = _open(path)
    kind = _field(reader, "general.type") or "model"
    if kind != "model":
        raise GgufError(f"{path.name} is a GGUF {kind}, not a model")
    arch = _field(reader, "general.architecture")
    if not arch or not reader.tensors:
        raise GgufError(f"{path.name} names no architecture or holds no tensors")
    ctx = _field(reader, f"{arch}.context_length")
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    return GgufModelInfo(path, str(arch), int(ctx) if ctx else None, shapes)


def check_lora(path: str | Path, base: GgufModelInfo) -> None:
    """GgufError unless `path` is a GGUF LoRA whose every tensor fits a tensor of `base`."""
    path = Path(path)
    reader = _open(path)
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise GgufError(f"{path.name} is not a GGUF LoRA adapter")
    arch = _field(reader, "general.architecture")
    if arch and arch != base.architecture:
        raise GgufError(f"{path.name} is a LoRA for {arch}, the model is {base.architecture}")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for tensor in reader.tensors:
        stem, suffix = tensor.name[:-7], tensor.name[-7:]
        if suffix not in _LORA_SUFFIXES:
            raise GgufError(f"{path.name}: {tensor.name} is not a lora_a/lora_b tensor")
        pairs.setdefault(stem, {})[suffix] = tuple(int(d) for d in tensor.shape)
    if not pairs:
        raise GgufError(f"{path.name} holds no LoRA tensors")
    for stem, pair in pairs.items():
        _check_pair(path.name, stem, pair, base)


def _check_pair(
    name: str, stem: str, pair: dict[str, tuple[int, ...]], base: GgufModelInfo
) -> None:
    if len(pair) != 2:
        raise GgufError(f"{name}: {stem} has only one of lora_a and lora_b")
    target = base.shapes.get(stem)
    if target is None:
        raise GgufError(f"{name}: the model has no tensor {stem} (a LoRA for another model?)")
    a, b = pair[".lora_a"], pair[".lora_b"]
    # ggml order: a is [in, rank], b is [rank, out]; the embedding table is stored flipped.
    if stem.startswith("token_embd"):
        fits = len(target) == 2 and target[0] == b[1] and target[1] == a[1]
    else:
        fits = len(target) == 2 and target[0] == a[0] and target[1] == b[1] and a[1] == b[0]
    if not fits:
        raise GgufError(
            f"{name}: {stem} has LoRA shapes {list(a)} x {list(b)}, which do not fit the "
            f"model's {list(target)} (a LoRA for another model?)"
        )
