"""PEFT LoRA adapters as GGUF LoRA files, so llama.cpp can serve what we train with PEFT.

A PEFT adapter stores, for each adapted linear layer `W` (out x in), two matrices: `lora_A`
(r x in) and `lora_B` (out x r); the layer computes `W x + (alpha / r) * B A x`. llama.cpp
reads the same pair from a GGUF file with `general.type = adapter`, `adapter.type = lora`
and `adapter.lora.alpha`, named after the base tensor (`blk.N.attn_q.weight.lora_a` / `_b`)
and scales it by `alpha / r` itself, so alpha is written as is and the tensors unscaled.

One layout difference matters: a Llama GGUF stores the rows of `attn_q` / `attn_k` in an
interleaved rotary order (the two halves of each head's rotary pairs side by side), where
Hugging Face keeps them half after half. The GGUF delta `B A` must be in the same order as
the weight it is added to, so the rows of `B` for q and k get the same per-head reordering;
that needs the head counts of the base model (its `config.json` or its GGUF).

Tensors are written in float32 (exact; a SmolLM2 adapter of rank 8 is about 10 MB), the
file is written to a temp name, fsynced and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

__all__ = [
    "BaseShape",
    "GgufBaseUnknownError",
    "GgufLoraError",
    "GgufLoraInfo",
    "base_shape",
    "check_gguf_lora",
    "write_gguf_lora",
]

# PEFT module name -> (the block it lives in, the llama.cpp tensor it adapts).
_MODULES = {
    "q_proj": ("self_attn", "attn_q"),
    "k_proj": ("self_attn", "attn_k"),
    "v_proj": ("self_attn", "attn_v"),
    "o_proj": ("self_attn", "attn_output"),
    "gate_proj": ("mlp", "ffn_gate"),
    "up_proj": ("mlp", "ffn_up"),
    "down_proj": ("mlp", "ffn_down"),
}
_GGUF_NAMES = {gguf_name: module for module, (_, gguf_name) in _MODULES.items()}
_PEFT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
_GGUF_KEY = re.compile(r"^blk\.(\d+)\.(\w+)\.weight\.lora_([ab])$")
# Hugging Face model_type -> (GGUF architecture, whether q/k rows are in rotary-interleaved order).
_ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}
_GGUF_ARCH_PERMUTES = {arch: permute for arch, permute in _ARCHITECTURES.values()}
# Adapter options whose effect a plain GGUF LoRA (one alpha, A and B only) cannot express.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) adds a magnitude vector llama.cpp LoRA files cannot hold",
    "modules_to_save": "modules_to_save stores whole replaced layers, not a LoRA pair",
    "rank_pattern": "per-module ranks (rank_pattern) need per-module scales",
    "alpha_pattern": "per-module alphas (alpha_pattern) need per-module scales",
    "lora_bias": "trained LoRA biases (lora_bias) have no place in a GGUF LoRA",
    "fan_in_fan_out": "fan_in_fan_out weights are for GPT-2 style Conv1D layers",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not a linear layer",
    "layer_replication": "layer_replication changes the model's layer layout",
}
_READ_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError, struct.error)


class GgufLoraError(ValueError):
    """A PEFT adapter cannot be turned into a GGUF LoRA, or a GGUF LoRA file is unusable."""


class GgufBaseUnknownError(GgufLoraError):
    """The base model's shape (head counts) is needed and could not be found."""


@dataclass(frozen=True)
class GgufLoraInfo:
    path: Path
    tensor_count: int
    rank: int
    alpha: float
    sha256: str
    architecture: str


@dataclass(frozen=True)
class BaseShape:
    """What the converter needs to know about the base model."""

    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int

    @property
    def permute_qk(self) -> bool:
        return _GGUF_ARCH_PERMUTES.get(self.architecture, False)

    def dims(self, module: str) -> tuple[int, int]:
        """(in, out) features of one adapted linear layer."""
        q_out, kv_out = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return {
            "q_proj": (self.n_embd, q_out),
            "k_proj": (self.n_embd, kv_out),
            "v_proj": (self.n_embd, kv_out),
            "o_proj": (q_out, self.n_embd),
            "gate_proj": (self.n_embd, self.n_ff),
            "up_proj": (self.n_embd, self.n_ff),
            "down_proj": (self.n_ff, self.n_embd),
        }[module]


# ------------------------------------------------------------------ base model shape
def _shape_from_hf(config: dict[str, Any], where: str) -> BaseShape:
    model_type = config.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise GgufLoraError(
            f"{where}: model_type {model_type!r} is not supported for GGUF LoRA conversion "
            f"(supported: {', '.join(sorted(_ARCHITECTURES))})"
        )
    try:
        n_embd = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        return BaseShape(
            architecture=_ARCHITECTURES[model_type][0],
            n_layer=int(config["num_hidden_layers"]),
            n_embd=n_embd,
            n_ff=int(config["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or n_embd // n_head),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise GgufLoraError(f"{where}: base config lacks a usable {exc}") from exc


def _shape_from_gguf(path: Path) -> BaseShape:
    try:
        reader = gguf.GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()}
    except _READ_ERRORS as exc:
        raise GgufLoraError(f"base model {path.name} is not a readable GGUF file: {exc}") from exc
    arch = fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch not in _GGUF_ARCH_PERMUTES:
        raise GgufLoraError(f"base model {path.name}: architecture {arch!r} is not supported")

    def key(template: str) -> int | None:
        value = fields.get(template.format(arch=arch))
        return int(value) if value is not None else None

    required = {
        "n_layer": key(gguf.Keys.LLM.BLOCK_COUNT),
        "n_embd": key(gguf.Keys.LLM.EMBEDDING_LENGTH),
        "n_ff": key(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
        "n_head": key(gguf.Keys.Attention.HEAD_COUNT),
    }
    sizes = {name: value for name, value in required.items() if value is not None}
    if len(sizes) != len(required):
        raise GgufLoraError(f"base model {path.name} lacks its layer sizes in the metadata")
    return BaseShape(
        architecture=arch,
        n_head_kv=key(gguf.Keys.Attention.HEAD_COUNT_KV) or sizes["n_head"],
        head_dim=key(gguf.Keys.Attention.KEY_LENGTH) or sizes["n_embd"] // sizes["n_head"],
        **sizes,
    )


def base_shape(base: Path | dict[str, Any]) -> BaseShape:
    """The base model's shape from a config dict, a `config.json`, a model directory holding
    one, or a GGUF model file."""
    if isinstance(base, dict):
        return _shape_from_hf(base, "base config")
    path = Path(base)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise GgufBaseUnknownError(f"base model config {path} does not exist")
    if path.suffix == ".gguf":
        return _shape_from_gguf(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GgufLoraError(f"base config {path} cannot be read: {exc}") from exc
    if not isinstance(config, dict):
        raise GgufLoraError(f"base config {path} is not a JSON object")
    return _shape_from_hf(config, str(path))


def _resolve_base(
    adapter_dir: Path, peft: dict[str, Any], base_config: Path | dict[str, Any] | None
) -> BaseShape:
    if base_config is not None:
        return base_shape(base_config)
    if (adapter_dir / "config.json").is_file():
        return base_shape(adapter_dir / "config.json")
    recorded = peft.get("base_model_name_or_path")
    if isinstance(recorded, str) and recorded and (Path(recorded) / "config.json").is_file():
        return base_shape(Path(recorded))
    raise GgufBaseUnknownError(
        f"adapter {adapter_dir.name}: the base model's config is needed (head counts for the "
        f"rotary layout) and base_model_name_or_path={recorded!r} is not a local model directory"
    )


# ------------------------------------------------------------------ reading the adapter
def _lora_scaling(peft: dict[str, Any], name: str) -> tuple[int, float]:
    """(rank, alpha to write) after refusing what a GGUF LoRA cannot express."""
    if peft.get("peft_type", "LORA") != "LORA":
        raise GgufLoraError(f"adapter {name} is a {peft.get('peft_type')} adapter, not LoRA")
    for option, why in _UNSUPPORTED_OPTIONS.items():
        if peft.get(option):
            raise GgufLoraError(f"adapter {name} cannot be converted: {why}")
    if peft.get("bias", "none") != "none":
        raise GgufLoraError(
            f"adapter {name} trains biases (bias={peft['bias']!r}); not convertible"
        )
    rank, alpha = peft.get("r"), peft.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, int | float):
        raise GgufLoraError(f"adapter {name}: adapter_config.json has no valid r / lora_alpha")
    # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r: write the alpha that gives
    # the same scale.
    return rank, float(alpha) * math.sqrt(rank) if peft.get("use_rslora") else float(alpha)


def _read_pairs(adapter_dir: Path) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """(layer, module) -> {"A": r x in, "B": out x r}, float32."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                match = _PEFT_KEY.match(key)
                if match is None or _MODULES.get(match[3], ("",))[0] != match[2]:
                    unknown.append(key)
                    continue
                tensor = fh.get_tensor(key).float().numpy()
                pairs.setdefault((int(match[1]), match[3]), {})[match[4]] = tensor
    except (OSError, RuntimeError, ValueError) as exc:
        raise GgufLoraError(f"adapter {adapter_dir.name}: weights cannot be read: {exc}") from exc
    if unknown:
        shown = ", ".join(unknown[:3]) + (
            f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        )
        raise GgufLoraError(
            f"adapter {adapter_dir.name} has tensors outside the Llama attention/MLP projections "
            f"(q/k/v/o/gate/up/down_proj): {shown}"
        )
    if not pairs:
        raise GgufLoraError(f"adapter {adapter_dir.name} holds no LoRA tensors")
    return pairs


def _check_pairs(
    pairs: dict[tuple[int, str], dict[str, np.ndarray]], rank: int, base: BaseShape, name: str
) -> None:
    for (layer, module), pair in sorted(pairs.items()):
        where = f"adapter {name}: layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise GgufLoraError(f"{where} has lora_{next(iter(pair))} without its partner")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise GgufLoraError(
                f"{where}: rank mismatch (lora_A {list(a.shape)}, lora_B {list(b.shape)}, "
                f"config r={rank})"
            )
        if layer >= base.n_layer:
            raise GgufLoraError(
                f"{where}: the base model has only {base.n_layer} layers (wrong base model?)"
            )
        n_in, n_out = base.dims(module)
        if (a.shape[1], b.shape[0]) != (n_in, n_out):
            raise GgufLoraError(
                f"{where} maps {a.shape[1]} -> {b.shape[0]} features but the base model's "
                f"layer maps {n_in} -> {n_out} (the adapter was trained on another base model)"
            )


def _rope_rows(b: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k delta from half-split to interleaved rotary order."""
    out, rank = b.shape
    half = out // n_heads // 2
    return b.reshape(n_heads, 2, half, rank).transpose(0, 2, 1, 3).reshape(out, rank)


# ------------------------------------------------------------------ writing and checking
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_gguf_lora(
    adapter_dir: Path, out_path: Path, *, base_config: Path | dict[str, Any] | None = None
) -> GgufLoraInfo:
    """Convert the PEFT LoRA in `adapter_dir` to a GGUF LoRA at `out_path`, atomically.

    `base_config` is the base model's config dict, `config.json`, model directory or GGUF
    file; without it, `adapter_dir/config.json` or the adapter's recorded base directory.
    """
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise GgufLoraError(
            f"adapter {adapter_dir} needs adapter_config.json and adapter_model.safetensors"
        )
    try:
        peft = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GgufLoraError(f"adapter {adapter_dir.name}: bad adapter_config.json: {exc}") from exc
    if not isinstance(peft, dict):
        raise GgufLoraError(f"adapter {adapter_dir.name}: adapter_config.json is not an object")
    rank, alpha = _lora_scaling(peft, adapter_dir.name)
    base = _resolve_base(adapter_dir, peft, base_config)
    pairs = _read_pairs(adapter_dir)
    _check_pairs(pairs, rank, base, adapter_dir.name)

    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, base.architecture)
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for (layer, module), pair in sorted(pairs.items()):
            b = pair["B"]
            if base.permute_qk and module in ("q_proj", "k_proj"):
                b = _rope_rows(b, base.n_head if module == "q_proj" else base.n_head_kv)
            name = f"blk.{layer}.{_MODULES[module][1]}.weight"
            # numpy (r, in) / (out, r) are ggml ne [in, r] / [r, out]: what llama.cpp expects.
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(pair["A"], np.float32))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(out_path.parent)
    return GgufLoraInfo(out_path, 2 * len(pairs), rank, alpha, digest, base.architecture)


def _gguf_pairs(reader: gguf.GGUFReader, name: str) -> dict[tuple[int, str], dict[str, Any]]:
    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    for tensor in reader.tensors:
        match = _GGUF_KEY.match(tensor.name)
        if match is None or match[2] not in _GGUF_NAMES:
            raise GgufLoraError(f"GGUF LoRA {name} has an unexpected tensor {tensor.name!r}")
        pairs.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    return pairs


def check_gguf_lora(path: Path, *, base: BaseShape | Path | None = None) -> GgufLoraInfo:
    """Parse a GGUF LoRA and check it is one (and, given `base`, that it fits that model)."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
        fields = {key: field.contents() for key, field in reader.fields.items()}
    except _READ_ERRORS as exc:
        raise GgufLoraError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    if fields.get(gguf.Keys.General.TYPE) != gguf.GGUFType.ADAPTER or (
        fields.get(gguf.Keys.Adapter.TYPE) != "lora"
    ):
        raise GgufLoraError(f"{path.name} is not a GGUF LoRA adapter")
    pairs = _gguf_pairs(reader, path.name)
    alpha, arch = (
        fields.get(gguf.Keys.Adapter.LORA_ALPHA),
        fields.get(gguf.Keys.General.ARCHITECTURE),
    )
    if not isinstance(alpha, float) or not isinstance(arch, str) or not pairs:
        raise GgufLoraError(f"{path.name} lacks its alpha, architecture or tensors")
    shape = base if isinstance(base, BaseShape) or base is None else base_shape(base)
    if shape is not None and shape.architecture != arch:
        raise GgufLoraError(
            f"{path.name} is for a {arch} model, the base model is {shape.architecture}"
        )
    ranks = set()
    for (layer, gguf_name), pair in sorted(pairs.items()):
        if set(pair) != {"a", "b"}:
            raise GgufLoraError(f"{path.name}: blk.{layer}.{gguf_name} lacks lora_a or lora_b")
        (n_in, r_a), (r_b, n_out) = (tuple(int(d) for d in pair[k].shape) for k in ("a", "b"))
        if r_a != r_b:
            raise GgufLoraError(f"{path.name}: blk.{layer}.{gguf_name} has mismatched ranks")
        ranks.add(r_a)
        if shape is not None:
            want = shape.dims(_GGUF_NAMES[gguf_name])
            if layer >= shape.n_layer or (n_in, n_out) != want:
                raise GgufLoraError(
                    f"{path.name} does not fit the base model: blk.{layer}.{gguf_name} maps "
                    f"{n_in} -> {n_out}, the base has {shape.n_layer} layers mapping "
                    f"{want[0]} -> {want[1]}"
                )
    if len(ranks) != 1:
        raise GgufLoraError(f"{path.name} mixes ranks {sorted(ranks)}; one alpha cannot fit all")
    return GgufLoraInfo(path, 2 * len(pairs), ranks.pop(), alpha, _sha256(path), arch)
