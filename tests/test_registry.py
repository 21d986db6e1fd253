"""The adapter registry on real files, a real SQLite database and real PEFT adapters."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.settings import load_settings
from learner.adapters_cli import register
from learner.registry import (
    ACTIVE_FILE,
    AdapterError,
    AdapterManifest,
    AdapterNotFoundError,
    AdapterRegistry,
    AdapterVerificationError,
    hash_file,
)
from storage.db import Database


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> Path:
    """A real (untrained, randomly initialised) LoRA adapter saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=128,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    path = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(path))
    assert (path / "adapter_model.safetensors").is_file()
    return path


@pytest.fixture
def db(tmp_path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'data' / 'upc.db'}", data_dir=tmp_path / "data")


@pytest.fixture
def registry(tmp_path, db) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "data" / "adapters", db)


def _manifest(adapter_id: str, **extra) -> AdapterManifest:
    values = {
        "id": adapter_id,
        "iteration": 1,
        "base_model_id": "tiny",
        "training_config": {"lora_rank": 4},
        "training_dialogue_ids": ["d1", "d2"],
        "training_set_hash": "abc",
        "code_version": {"package": "0.1.0", "git_commit": None},
    }
    values.update(extra)
    return AdapterManifest(**values)


def test_publish_verify_list_get(registry, peft_dir):
    published = registry.publish(peft_dir, _manifest("it001"))
    assert published.status == "candidate" and published.created_at
    assert set(published.files) >= {"adapter_config.json", "adapter_model.safetensors"}
    for name, digest in published.files.items():
        assert hash_file(registry.path("it001") / name) == digest
    data = json.loads((registry.path("it001") / "manifest.json").read_text())
    for key in (
        "id",
        "parent_id",
        "iteration",
        "base_model_id",
        "base_weights_sha256",
        "training_config",
        "training_dialogue_ids",
        "training_set_hash",
        "metrics",
        "code_version",
        "created_at",
        "status",
        "status_reason",
        "files",
    ):
        assert key in data, key
    assert registry.verify("it001").id == "it001"
    assert [m.id for m in registry.list()] == ["it001"]
    assert registry.get("it001").training_dialogue_ids == ["d1", "d2"]
    with pytest.raises(AdapterError, match="already exists"):
        registry.publish(peft_dir, _manifest("it001"))
    with pytest.raises(AdapterError, match="invalid adapter id"):
        registry.publish(peft_dir, _manifest("../evil"))
    with pytest.raises(AdapterNotFoundError):
        registry.get("nope")


@pytest.mark.parametrize("stage", ["copied", "manifest", "synced"])
def test_crash_during_publish_leaves_nothing_listable(registry, peft_dir, stage):
    def crash(at: str) -> None:
        if at == stage:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        registry.publish(peft_dir, _manifest("it001"), hook=crash)
    assert registry.list() == []
    assert not registry.path("it001").exists()
    assert list(registry.adapters_dir.iterdir()) == []
    # The id is free again: a retry publishes normally.
    assert registry.publish(peft_dir, _manifest("it001")).id == "it001"


def test_sigkill_mid_publish_leaves_nothing_listable(registry, peft_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from learner.registry import AdapterManifest, AdapterRegistry
        from storage.db import Database

        data = Path("{tmp_path / "data"}")
        db = Database(f"sqlite:///{{data / 'upc.db'}}", data_dir=data)
        registry = AdapterRegistry(Path("{registry.adapters_dir}"), db)

        def die(stage):
            if stage == "synced":
                os.kill(os.getpid(), signal.SIGKILL)

        registry.publish(Path("{peft_dir}"), AdapterManifest(id="killed"), hook=die)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    leftovers = [p.name for p in registry.adapters_dir.iterdir()]
    assert leftovers and all(name.startswith(".tmp-") for name in leftovers)
    fresh = AdapterRegistry(registry.adapters_dir, registry.db)
    assert fresh.list() == []
    with pytest.raises(AdapterNotFoundError):
        fresh.verify("killed")
    with pytest.raises(AdapterNotFoundError):
        fresh.activate("killed")
    assert fresh.active_id() == "base"


class _Payload:
    """Unpickling this creates a directory: proof that the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_adapter_is_refused_without_running_its_payload(registry, peft_dir, tmp_path):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.is_dir(), "the payload must really run when unpickled"

    marker = tmp_path / "pwned-marker"
    evil = tmp_path / "evil"
    shutil.copytree(peft_dir, evil)
    (evil / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(AdapterVerificationError, match="pickle"):
        registry.import_dir(evil)
    assert registry.list() == []

    # Also when it sneaks into a published adapter with a matching manifest hash.
    registry.publish(peft_dir, _manifest("good"))
    registry.activate("good")
    registry.publish(peft_dir, _manifest("sneaky"))
    shutil.copy(evil / "adapter_model.bin", registry.path("sneaky") / "adapter_model.bin")
    manifest = registry.get("sneaky")
    manifest.files["adapter_model.bin"] = hash_file(registry.path("sneaky") / "adapter_model.bin")
    (registry.path("sneaky") / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    with pytest.raises(AdapterVerificationError, match="pickle files"):
        registry.verify("sneaky")
    with pytest.raises(AdapterVerificationError):
        registry.activate("sneaky")
    assert registry.active_id() == "good"
    assert not marker.exists()


def test_hash_mismatch_missing_file_and_bad_manifest_are_refused(registry, peft_dir):
    for name in ("tampered", "incomplete", "garbled"):
        registry.publish(peft_dir, _manifest(name))
    registry.activate("garbled")

    weights = registry.path("tampered") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterVerificationError, match="does not match its manifest hash"):
        registry.verify("tampered")
    with pytest.raises(AdapterVerificationError):
        registry.activate("tampered")

    (registry.path("incomplete") / "adapter_config.json").unlink()
    with pytest.raises(AdapterVerificationError, match=r"missing adapter_config\.json"):
        registry.verify("incomplete")

    (registry.path("garbled") / "manifest.json").write_text("{not json")
    with pytest.raises(AdapterVerificationError, match="cannot be parsed"):
        registry.verify("garbled")
    assert "garbled" not in [m.id for m in registry.list()]
    # The served choice did not move on any refusal.
    assert registry.active_id() == "garbled"


def test_import_checks(registry, peft_dir, tmp_path):
    plain = registry.import_dir(peft_dir)
    assert plain.id.startswith("import-") and plain.source == "imported"
    assert plain.status == "candidate" and "imported from" in plain.status_reason
    registry.verify(plain.id)
    with pytest.raises(AdapterError, match="already exists"):
        registry.import_dir(peft_dir)

    # An adapter exported from another registry keeps its id and lineage.
    other = AdapterRegistry(tmp_path / "elsewhere", registry.db)
    other.publish(peft_dir, _manifest("gpu-it003", iteration=3, parent_id="gpu-it002"))
    imported = registry.import_dir(other.path("gpu-it003"))
    assert (imported.id, imported.iteration, imported.parent_id) == ("gpu-it003", 3, "gpu-it002")

    extra = tmp_path / "extra"
    shutil.copytree(other.path("gpu-it003"), extra)
    (extra / "notes.txt").write_text("hi")
    with pytest.raises(AdapterVerificationError, match="not in its manifest"):
        registry.import_dir(extra, adapter_id="x1")

    broken = tmp_path / "broken"
    shutil.copytree(peft_dir, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(AdapterVerificationError, match="safetensors"):
        registry.import_dir(broken)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterVerificationError, match=r"missing adapter_config\.json"):
        registry.import_dir(empty)
    with pytest.raises(AdapterNotFoundError):
        registry.import_dir(tmp_path / "does-not-exist")


def test_activate_rollback_retire(registry, peft_dir):
    for name in ("a", "b", "c"):
        registry.publish(peft_dir, _manifest(name))
    assert registry.active_id() == "base"
    with pytest.raises(AdapterError, match="nothing to roll back"):
        registry.rollback()

    registry.activate("a")
    registry.activate("b")
    assert registry.get("b").status == "active" and registry.get("a").status == "candidate"
    assert registry.rollback() == "a"
    assert registry.get("a").status == "active" and registry.get("b").status == "candidate"
    assert registry.rollback() == "base"
    assert registry.get("a").status == "candidate"

    registry.activate("a")
    registry.activate("b")
    registry.activate("c")
    with pytest.raises(AdapterError, match="is active"):
        registry.retire("c")
    registry.retire("b", "worse on validation")
    assert registry.get("b").status == "retired"
    assert registry.get("b").status_reason == "worse on validation"
    with pytest.raises(AdapterError, match="retired"):
        registry.activate("b")
    # Rollback skips the retired one.
    assert registry.rollback() == "a"
    assert registry.activate("base") == "base"
    assert [r.action for r in registry.history()][-2:] == ["rollback", "activate"]


def test_active_choice_persists_across_instances(tmp_path, peft_dir):
    data = tmp_path / "data"
    db = Database(f"sqlite:///{data / 'upc.db'}", data_dir=data)
    first = AdapterRegistry(data / "adapters", db)
    first.publish(peft_dir, _manifest("a"))
    first.publish(peft_dir, _manifest("b"))
    first.activate("a")
    first.activate("b")
    db.dispose()

    db2 = Database(f"sqlite:///{data / 'upc.db'}", data_dir=data)
    second = AdapterRegistry(data / "adapters", db2)
    assert second.active_id() == "b"
    assert (data / "adapters" / ACTIVE_FILE).read_text().strip() == "b"
    assert second.rollback() == "a"
    # Without the ACTIVE file (e.g. lost), the history in storage still answers.
    (data / "adapters" / ACTIVE_FILE).unlink()
    third = AdapterRegistry(data / "adapters", db2)
    assert third.active_id() == "a"


def test_adapters_cli(tmp_path, peft_dir, capsys):
    import argparse

    settings = load_settings(env={}, data_dir=tmp_path / "cli-data")
    parser = argparse.ArgumentParser(prog="upc")
    register(parser.add_subparsers(dest="group"))

    def upc(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args, settings)

    assert upc("adapters", "import", str(peft_dir), "--id", "gpu1") == 0
    assert upc("adapters", "activate", "gpu1") == 0
    assert upc("adapters", "list") == 0
    out = capsys.readouterr().out
    assert "active: gpu1" in out and "*  gpu1" in out
    assert upc("adapters", "show", "gpu1") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["verified"] and shown["active"] and shown["status"] == "active"
    assert upc("adapters", "retire", "gpu1") == 1
    assert "is active" in capsys.readouterr().err
    assert upc("adapters", "activate", "base") == 0
    assert upc("adapters", "retire", "gpu1", "--reason", "old") == 0
    assert upc("adapters", "rollback") == 1  # gpu1 is retired, base is the first
    assert upc("adapters", "import", str(tmp_path / "missing")) == 1
    reg = AdapterRegistry(settings.adapters_dir, Database.from_settings(settings))
    assert reg.active_id() == "base" and reg.get("gpu1").status_reason == "old"
