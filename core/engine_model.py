"""The openai backend on a serving engine that takes LoRA adapters at run time.

`EngineModel` is an `OpenAIModel` that also has the adapter controls the app's
`AdapterManager` drives (`adapters`, `load_adapter`, `unload_adapter`,
`serve_by_default`), so a promoted adapter is pushed to the engine and `upc` traffic is
routed to it; a push that fails raises and the manager keeps serving the old adapter.

- **llama.cpp's server** reads LoRA files only when it starts (`--lora FILE`, best with
  `--lora-init-without-apply`). At run time `GET /lora-adapters` lists them by index, each
  request picks its own (`"lora": [{"id", "scale"}]`; an empty list means the base), and
  `POST /lora-adapters` sets what requests that pick none get. A push finds the adapter's
  GGUF in that list, or fails saying how to start the server with it.
- **vLLM** (`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) loads an adapter
  directory with `POST /v1/load_lora_adapter` and serves it as the model of that name.
  Written from vLLM's documented API and not run here (docs/deploy.md).

`adapter_dir` is the adapter store as the engine sees it (another host or container);
empty when the engine reads the same paths as this process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import httpx

from core.openai_model import OpenAIModel
from core.types import BASE_ADAPTER, ChatMessage, GenerationParams, ModelError

__all__ = ["ENGINES", "EngineModel", "EnginePushError", "engine_root"]

log = logging.getLogger(__name__)

Engine = Literal["llamacpp", "vllm"]
ENGINES: tuple[str, ...] = ("llamacpp", "vllm")
_DETAIL_CHARS = 300  # of an engine's error body in our messages


class EnginePushError(ModelError):
    """The serving engine did not take an adapter; what it served before still serves."""


def engine_root(base_url: str) -> str:
    """The engine's address without the OpenAI API's `/v1` suffix."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class EngineModel(OpenAIModel):
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        engine: Engine,
        adapter_dir: str = "",
        api_key: str | None = None,
        max_retries: int = 4,
        concurrency: int = 8,
        model_id: str | None = None,
        timeout_s: float = 30.0,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        super().__init__(
            base_url,
            model,
            api_key=api_key,
            max_retries=max_retries,
            concurrency=concurrency,
            model_id=model_id,
        )
        self.engine = engine
        self.adapter_dir = adapter_dir
        self.root = engine_root(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.root, headers=headers, timeout=timeout_s)
        # adapter id -> the engine's handle: llama.cpp's list index, vLLM's model name.
        self._loaded: dict[str, int | str] = {}
        self._ids: list[int] | None = None  # llama.cpp's adapter indices, as last listed
        self._lock = threading.Lock()

    @property
    def adapters(self) -> dict[str, int | str]:
        return dict(self._loaded)

    # ------------------------------------------------------------------ pushing
    def engine_path(self, adapter_id: str, local: Path) -> str:
        """Where the engine reads `local` (an adapter's directory or one of its files)."""
        if not self.adapter_dir:
            return str(local)
        inside = local.name if local.is_file() else ""
        return str(PurePosixPath(self.adapter_dir, adapter_id, inside)).rstrip("/")

    def load_adapter(self, adapter_id: str, path: Path) -> None:
        """Push a verified adapter (llama.cpp: its GGUF LoRA; vLLM: its directory)."""
        where = self.engine_path(adapter_id, Path(path))
        handle: int | str
        if self.engine == "llamacpp":
            handle = self._llamacpp_find(adapter_id, where)
        else:
            self._vllm_load(adapter_id, where)
            handle = adapter_id
        with self._lock:
            self._loaded[adapter_id] = handle
        log.info(
            "adapter %s is on the %s engine at %s as %s", adapter_id, self.engine, self.root, handle
        )

    def unload_adapter(self, adapter_id: str) -> None:
        """Stop routing to `adapter_id`. The engine keeps it: other replicas may still
        route to it for a poll interval, and a rollback needs it back at once."""
        with self._lock:
            self._loaded.pop(adapter_id, None)

    def serve_by_default(self, adapter_id: str) -> None:
        """Make `adapter_id` what the engine serves to requests that pick no adapter
        (llama.cpp; vLLM has no default: each request names its model)."""
        if self.engine != "llamacpp":
            return
        listed = self._llamacpp_list()
        wanted = self._loaded.get(adapter_id) if adapter_id != BASE_ADAPTER else None
        scales = [{"id": e["id"], "scale": 1.0 if e["id"] == wanted else 0.0} for e in listed]
        response = self._request("post", "/lora-adapters", json=scales)
        if response.status_code >= 400:
            raise EnginePushError(
                f"{self.root} refused its default adapter {adapter_id}: {_detail(response)}"
            )

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise EnginePushError(
                f"cannot reach the {self.engine} engine at {self.root}: {exc}"
            ) from exc

    def _llamacpp_list(self) -> list[dict[str, Any]]:
        response = self._request("get", "/lora-adapters")
        if response.status_code >= 400:
            raise EnginePushError(
                f"{self.root} answered HTTP {response.status_code} to GET /lora-adapters: "
                f"{_detail(response)}"
            )
        try:
            listed = response.json()
        except ValueError as exc:
            raise EnginePushError(f"{self.root}/lora-adapters is not JSON: {exc}") from exc
        if not isinstance(listed, list) or not all(
            isinstance(e, dict) and isinstance(e.get("id"), int) for e in listed
        ):
            raise EnginePushError(f"{self.root}/lora-adapters is not a list of adapters")
        self._ids = [int(e["id"]) for e in listed]
        return listed

    def _llamacpp_find(self, adapter_id: str, where: str) -> int:
        listed = self._llamacpp_list()
        for entry in listed:
            if _same_file(str(entry.get("path", "")), where):
                return int(entry["id"])
        raise EnginePushError(
            f"the llama.cpp server at {self.root} has no LoRA {where} for adapter {adapter_id} "
            f"({len(listed)} loaded): llama.cpp reads adapter files only when it starts, so "
            f"restart it with --lora {where} --lora-init-without-apply"
        )

    def _vllm_load(self, adapter_id: str, where: str) -> None:
        body = {"lora_name": adapter_id, "lora_path": where}
        response = self._request("post", "/v1/load_lora_adapter", json=body)
        if response.status_code < 400:
            return
        detail = _detail(response)
        if "already been loaded" in detail or "already loaded" in detail:
            return  # another replica pushed it first
        raise EnginePushError(
            f"vLLM at {self.root} did not load adapter {adapter_id} from {where}: "
            f"HTTP {response.status_code}: {detail}"
        )

    # ------------------------------------------------------------------ requests
    def _kwargs(
        self, messages: Sequence[ChatMessage], params: GenerationParams, adapter: str | None
    ) -> dict:
        kwargs = super()._kwargs(messages, params, adapter)
        if self.engine != "llamacpp":
            return kwargs
        kwargs["model"] = self.model
        wanted = None
        if adapter not in (None, BASE_ADAPTER):
            wanted = self._loaded.get(adapter)
            if wanted is None:
                raise ModelError(f"adapter {adapter} is not on the llama.cpp server at {self.root}")
        # Every listed adapter's scale, spelled out: an empty list leaves the server's
        # default (which `serve_by_default` may have set) in place.
        ids = self._ids if self._ids is not None else [e["id"] for e in self._llamacpp_list()]
        lora = [{"id": i, "scale": 1.0 if i == wanted else 0.0} for i in ids]
        kwargs["extra_body"] = {"lora": lora}
        return kwargs

    def close(self) -> None:
        self._http.close()
        super().close()


def _same_file(listed: str, wanted: str) -> bool:
    """The engine's listed path names the wanted file (the engine may list it relative)."""
    if not listed:
        return False
    a, b = PurePosixPath(listed), PurePosixPath(wanted)
    return a == b or (not a.is_absolute() and b.parts[-len(a.parts) :] == a.parts)


def _detail(response: httpx.Response) -> str:
    return response.text.strip().replace("\n", " ")[:_DETAIL_CHARS]
