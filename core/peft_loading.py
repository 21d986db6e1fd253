"""Loading LoRA adapters into a local model safely: refuse unsafe directories up front, and
take back whatever a failed load injected, so the model serves exactly what it did before."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.types import ModelError

__all__ = ["AdapterLoadError", "check_adapter_dir", "undo_failed_load"]

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterLoadError(ModelError):
    """An adapter directory was refused (unsafe format, missing files, wrong base)."""


def undo_failed_load(model: Any, adapter_id: str, *, first: bool) -> None:
    """Take out what a failed adapter load injected into `model`."""
    if not first:
        if adapter_id in getattr(model, "peft_config", {}):
            model.delete_adapter(adapter_id)
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    # The plain model was wrapped in place: put every original layer back.
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
    log.warning("adapter %s failed to load; the model is back as it was", adapter_id)


def check_adapter_dir(path: Path) -> None:
    if not path.is_dir():
        raise AdapterLoadError(f"adapter directory {path} does not exist")
    unsafe = [p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES]
    if unsafe:
        raise AdapterLoadError(
            f"adapter {path.name} contains pickle files ({', '.join(unsafe)}); "
            "only safetensors adapters are accepted"
        )
    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / required).is_file():
            raise AdapterLoadError(f"adapter {path.name} is missing {required}")
