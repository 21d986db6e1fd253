"""Promotion pushes adapters to an external serving engine (the openai backend with
`chatbot.engine`), tested against a real llama.cpp server (xllamacpp) on localhost.

The server is started the way docs/deploy.md tells an operator to start one: the base GGUF
and the adapters' GGUF LoRAs, loaded unapplied. The app reaches it only over HTTP, through
the settings (`UPC_CHATBOT__BACKEND=openai`, `__ENGINE=llamacpp`), as it would reach a
server on another host. vLLM cannot run here: its requests are built from its documented
API and only the shared push path (the manager, the registry, the console) is tested.
"""

import json
import socket

import httpx
import pytest

from chatbot.console.data import ConsoleData
from chatbot.services import build_services
from core.engine_model import EngineModel, EnginePushError, engine_root
from core.llamacpp_server import LlamaServer, ServerSpec
from core.openai_model import OpenAIModel
from core.runtime import build_model, embedded_gguf_path
from core.settings import SettingsError, load_settings, masked_dict
from core.types import BASE_ADAPTER, ChatMessage, GenerationParams, ModelError
from learner.registry import AdapterRegistry
from storage import Database
from tests.test_llamacpp_adapters import _random_lora

pytestmark = pytest.mark.slow

MSGS = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi, I keep bees.")]
GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, embedded_model_dir):
    """A data dir with three adapters; a llama.cpp server that loaded two of them."""
    root = tmp_path_factory.mktemp("engine")
    data_dir = root / "upc-data"
    db = Database(f"sqlite:///{data_dir}/upc.db", data_dir=data_dir)
    registry = AdapterRegistry(data_dir / "adapters", db)
    for seed, name in enumerate(("one", "two", "late")):
        src = _random_lora(embedded_model_dir, root / f"src-{name}", seed=seed, scale=0.5)
        registry.import_dir(src, adapter_id=name, base_config=embedded_model_dir)
    # The operator's server: started with the adapters that existed then ("late" came after).
    loras = tuple(str(registry.gguf_path(name)) for name in ("one", "two"))
    server = LlamaServer(ServerSpec(gguf=str(embedded_gguf_path()), loras=loras, n_parallel=2))
    db.dispose()
    yield data_dir, server
    server.close()


def _settings(data_dir, server, **env):
    return load_settings(
        env={
            "UPC_DATA_DIR": str(data_dir),
            "UPC_CHATBOT__BACKEND": "openai",
            "UPC_CHATBOT__BASE_URL": f"{server.base_url}/v1",
            "UPC_CHATBOT__MODEL": "smollm2",
            "UPC_CHATBOT__ENGINE": "llamacpp",
            "UPC_CHATBOT__API_KEY_ENV": "UPC_TEST_ENGINE_KEY",
            "UPC_MEMORY__ENABLED": "false",
            **env,
        }
    )


def _opening(text: str) -> str:
    return " ".join(text.split()[:3])


def _listed(server) -> list[dict]:
    response = httpx.get(
        f"{server.base_url}/lora-adapters",
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def test_promotion_pushes_routes_and_a_failed_push_keeps_the_old_adapter(engine, monkeypatch):
    data_dir, server = engine
    monkeypatch.setenv("UPC_TEST_ENGINE_KEY", server.api_key)
    settings = _settings(data_dir, server)
    services = build_services(settings)
    try:
        model = services.chatbot_model
        assert isinstance(model, EngineModel) and model.engine == "llamacpp"
        # A client of the engine that names no adapter: what the engine serves by default.
        plain = OpenAIModel(f"{server.base_url}/v1", "smollm2", api_key=server.api_key)
        base = _opening(model.generate(MSGS, GREEDY).text)
        assert _opening(plain.generate(MSGS, GREEDY).text) == base

        # Promotion: the registry names "one"; the app's watcher pushes and routes to it.
        services.registry.activate("one", reason="promoted by the gate")
        services.adapters.sync()
        assert services.adapters.active == "one" and services.adapters.last_error is None
        assert set(model.adapters) == {"one"}
        one = _opening(model.generate(MSGS, GREEDY, adapter="one").text)
        assert one != base, "the pushed adapter changes the greedy reply"
        # The engine itself now serves "one" to clients that name no adapter ...
        scales = {e["path"]: e["scale"] for e in _listed(server)}
        assert scales[str(services.registry.gguf_path("one"))] == 1.0
        assert _opening(plain.generate(MSGS, GREEDY).text) == one
        # ... while this app's base requests still get the base (every scale 0).
        assert _opening(model.generate(MSGS, GREEDY, adapter=BASE_ADAPTER).text) == base
        # A/B and the console's compare address adapters per request, side by side.
        model.load_adapter("two", services.registry.gguf_path("two"))
        two = _opening(model.generate(MSGS, GREEDY, adapter="two").text)
        assert len({base, one, two}) == 3

        # An adapter the engine never loaded: the push fails, "one" keeps serving, the
        # registry points back at it, and the console shows why.
        services.registry.activate("late", reason="promoted by the gate")
        services.adapters.sync()
        assert services.adapters.active == "one"
        assert services.registry.active_id() == "one"
        error = services.adapters.last_error or ""
        assert "late" in error and "--lora" in error, error
        assert error in ConsoleData(services).status_line()
        assert _opening(model.generate(MSGS, GREEDY, adapter="one").text) == one
        assert {e["scale"] for e in _listed(server)} == {0.0, 1.0}
        plain.close()
    finally:
        services.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_dead_wrong_or_unsupported_engine_fails_clearly(engine):
    data_dir, server = engine
    gguf = data_dir / "adapters" / "one" / "adapter_model.gguf"
    assert gguf.is_file()
    dead = EngineModel(f"http://127.0.0.1:{_free_port()}/v1", "m", engine="llamacpp")
    with pytest.raises(EnginePushError, match="cannot reach the llamacpp engine"):
        dead.load_adapter("one", gguf)
    wrong_key = EngineModel(f"{server.base_url}/v1", "m", engine="llamacpp", api_key="wrong")
    with pytest.raises(EnginePushError, match="HTTP 401"):
        wrong_key.load_adapter("one", gguf)
    # vLLM's load endpoint on a server that has none: the engine's answer, not a crash.
    not_vllm = EngineModel(f"{server.base_url}/v1", "m", engine="vllm", api_key=server.api_key)
    with pytest.raises(EnginePushError, match=r"vLLM at .* did not load adapter one .* HTTP 404"):
        not_vllm.load_adapter("one", gguf.parent)
    assert not dead.adapters and not wrong_key.adapters and not not_vllm.adapters
    # An adapter no push reached can't be asked for by index.
    with pytest.raises(ModelError, match=r"not on the llama\.cpp server"):
        wrong_key.generate(MSGS, GREEDY, adapter="one")
    for model in (dead, wrong_key, not_vllm):
        model.close()


def test_engine_settings_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("UPC_TEST_ENGINE_KEY", "sk-test")
    env = {
        "UPC_DATA_DIR": str(tmp_path),
        "UPC_CHATBOT__BACKEND": "openai",
        "UPC_CHATBOT__BASE_URL": "http://engine.internal:8000/v1/",
        "UPC_CHATBOT__API_KEY_ENV": "UPC_TEST_ENGINE_KEY",
        "UPC_CHATBOT__ENGINE": "vllm",
        "UPC_CHATBOT__ENGINE_ADAPTER_DIR": "/srv/upc/adapters",
    }
    settings = load_settings(env=env)
    model = build_model(settings.chatbot, settings)
    assert isinstance(model, EngineModel) and model.engine == "vllm"
    assert (
        model.root
        == engine_root("http://engine.internal:8000/v1/")
        == "http://engine.internal:8000"
    )
    shown = masked_dict(settings)
    assert "sk-test" not in json.dumps(shown) and shown["chatbot"]["api_key"] == "***"
    assert shown["chatbot"]["engine"] == "vllm"
    adapter = tmp_path / "one"
    adapter.mkdir()
    (adapter / "adapter_model.gguf").write_bytes(b"x")
    # The engine reads the adapter store at its own path.
    assert model.engine_path("one", adapter) == "/srv/upc/adapters/one"
    assert model.engine_path("one", adapter / "adapter_model.gguf") == (
        "/srv/upc/adapters/one/adapter_model.gguf"
    )
    model.close()
    with pytest.raises(SettingsError, match=r"engine needs chatbot\.backend = openai"):
        load_settings(env={"UPC_DATA_DIR": str(tmp_path), "UPC_CHATBOT__ENGINE": "llamacpp"})
    with pytest.raises(SettingsError):
        load_settings(env={**env, "UPC_CHATBOT__ENGINE": "tgi"})
