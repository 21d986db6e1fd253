"""The openai backend against real local HTTP servers that misbehave: 429/5xx retries,
garbage, a dead port. (The happy path against our own /v1 is in test_app_http.py.)"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.openai_model import OpenAIModel
from core.runtime import build_model
from core.settings import load_settings
from core.types import ChatMessage, GenerationParams, ModelBusyError, ModelError

MSGS = [ChatMessage("user", "hi")]
PARAMS = GenerationParams(max_new_tokens=5, timeout_s=10)
OK_BODY = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def serve(statuses):
    """A server answering the given statuses in order, then 200 with OK_BODY."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            calls.append(self.path)
            status = statuses[len(calls) - 1] if len(calls) <= len(statuses) else 200
            body = json.dumps(OK_BODY if status == 200 else {"error": {"message": "nope"}}).encode()
            if status == "garbage":
                status, body = 200, b"this is not json"
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("retry-after", "0")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


@pytest.fixture
def server_factory():
    servers = []

    def make(statuses):
        server, calls = serve(statuses)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", calls

    yield make
    for server in servers:
        server.shutdown()


def test_429_and_5xx_are_retried_with_backoff_then_succeed(server_factory):
    url, calls = server_factory([429, 503, 500])
    model = OpenAIModel(url, "m", max_retries=4)
    assert model.generate(MSGS, PARAMS).text == "hello"
    assert len(calls) == 4


def test_retries_are_bounded(server_factory):
    url, calls = server_factory([503] * 10)
    with pytest.raises(ModelError, match="503"):
        OpenAIModel(url, "m", max_retries=2).generate(MSGS, PARAMS)
    assert len(calls) == 3
    url, calls = server_factory([429] * 10)
    with pytest.raises(ModelBusyError):
        OpenAIModel(url, "m", max_retries=1).generate(MSGS, PARAMS)
    assert len(calls) == 2


def test_garbage_and_dead_endpoints_fail_clearly(server_factory):
    url, _ = server_factory(["garbage"])
    with pytest.raises(ModelError):
        OpenAIModel(url, "m", max_retries=0).generate(MSGS, PARAMS)
    with pytest.raises(ModelError, match="cannot reach"):
        OpenAIModel("http://127.0.0.1:9/v1", "m", max_retries=0).generate(MSGS, PARAMS)


def test_api_key_comes_from_the_environment_only(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_PROVIDER_KEY", "sk-test-from-env-000000000000")
    settings = load_settings(
        env={
            "UPC_DATA_DIR": str(tmp_path),
            "UPC_CRITIC__BACKEND": "openai",
            "UPC_CRITIC__BASE_URL": "http://127.0.0.1:9/v1",
            "UPC_CRITIC__MODEL": "judge",
            "UPC_CRITIC__API_KEY_ENV": "MY_PROVIDER_KEY",
        }
    )
    model = build_model(settings.critic, settings)
    assert model._client.api_key == "sk-test-from-env-000000000000"
    assert "sk-test" not in repr(settings)
