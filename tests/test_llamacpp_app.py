"""Which backend serves chat, and the app serving through llama.cpp over real HTTP.

`auto` picks llama.cpp on a CPU when xllamacpp imports and the model has a GGUF, else the
torch backend, and the log says why. Bad files and a missing wheel are clear errors.
"""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import openai
import pytest
from gradio_client import Client

from core.llamacpp_model import LlamaCppModel
from core.llamacpp_server import LlamaServer, ServerSpec, ServerStartError
from core.local_model import LocalModel
from core.runtime import build_model, embedded_gguf_path, pick_backend
from core.settings import load_settings
from core.types import ModelError
from tests.conftest import REPO, embedded_app
from tests.test_app_http import text_of

pytestmark = pytest.mark.slow


def test_auto_serves_the_embedded_gguf_through_llamacpp_on_a_cpu():
    settings = load_settings(env={})
    assert settings.chatbot.backend == "auto" and settings.critic.backend == "local"
    choice = pick_backend(settings.chatbot, settings)
    assert choice.backend == "llamacpp" and choice.gguf == embedded_gguf_path()
    assert "xllamacpp" in choice.reason


def test_auto_falls_back_to_torch_and_says_why(tiny_model_dir, monkeypatch, caplog):
    no_gguf = load_settings(env={}, chatbot__model=str(tiny_model_dir))
    choice = pick_backend(no_gguf.chatbot, no_gguf)
    assert choice.backend == "local" and "has no GGUF" in choice.reason
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # the wheel is not installed
    embedded = load_settings(env={})
    choice = pick_backend(embedded.chatbot, embedded)
    assert choice.backend == "local" and "xllamacpp does not import" in choice.reason
    with caplog.at_level(logging.INFO, logger="core.runtime"):
        model = build_model(no_gguf.chatbot, no_gguf)
    try:
        assert isinstance(model, LocalModel)
        assert "backend: local, because of xllamacpp does not import" in caplog.text
    finally:
        model.close()


def test_an_explicit_llamacpp_backend_without_a_gguf_is_a_clear_error(tiny_model_dir):
    settings = load_settings(
        env={}, chatbot__backend="llamacpp", chatbot__model=str(tiny_model_dir)
    )
    with pytest.raises(ModelError, match="needs a GGUF"):
        pick_backend(settings.chatbot, settings)


def _broken_copies(tmp_path):
    data = embedded_gguf_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 3])
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(os.urandom(4096))
    mangled = bytearray(data[:4_000_000])
    mangled[200:400] = b"\xff" * 200
    garbled = tmp_path / "garbled.gguf"
    garbled.write_bytes(bytes(mangled) + data[4_000_000:])
    return {"cut": cut, "noise": noise, "garbled": garbled}


def test_corrupt_or_truncated_ggufs_are_clear_errors(tmp_path, tiny_model_dir, caplog):
    broken = _broken_copies(tmp_path)
    for path in broken.values():
        with pytest.raises(ModelError, match=r"cannot serve .*(corrupt|cut short|GGUF)"):
            LlamaCppModel(path)
    with pytest.raises(ModelError, match="does not exist"):
        LlamaCppModel(tmp_path / "missing.gguf")
    # Under `auto`, a GGUF llama.cpp can't serve leaves chat to torch, with the reason logged.
    settings = load_settings(
        env={}, chatbot__model=str(tiny_model_dir), llamacpp__gguf=str(broken["cut"])
    )
    with caplog.at_level(logging.WARNING, logger="core.runtime"):
        model = build_model(settings.chatbot, settings)
    try:
        assert isinstance(model, LocalModel)
        assert "backend: local, because llama.cpp failed" in caplog.text
    finally:
        model.close()


def test_a_server_process_without_the_wheel_says_so(tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "xllamacpp.py").write_text("raise ImportError('no wheel for this CPU')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    with pytest.raises(ServerStartError, match="xllamacpp wheel does not import"):
        LlamaServer(ServerSpec(str(embedded_gguf_path())), timeout_s=60)


def test_the_server_process_ends_when_the_app_is_killed(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from core.llamacpp_server import LlamaServer, ServerSpec
        server = LlamaServer(ServerSpec({str(embedded_gguf_path())!r}, ctx_tokens=256))
        print(server.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)  # no cleanup runs in the parent
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child), "the llama.cpp process outlived the app"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def llamacpp_app(tmp_path_factory, embedded_model_dir):
    yield from embedded_app(
        tmp_path_factory.mktemp("llamacpp-app"),
        embedded_model_dir,
        UPC_AUTH__MODE="anonymous",
        UPC_CHATBOT__BACKEND="llamacpp",
        UPC_LLAMACPP__CTX_TOKENS="1024",
        UPC_MEMORY__ENABLED="false",
    )


def test_gradio_chat_streams_through_llamacpp(llamacpp_app):
    assert "llama.cpp serving SmolLM2-135M-Instruct.Q4_1.gguf" in llamacpp_app.log_path.read_text()
    client = Client(llamacpp_app.base_url, verbose=False)
    bid, _, history, *_ = client.predict("", api_name="/load")
    assert len(history) == 1 and text_of(history[0])
    job = client.submit("Tell me about bread.", history, bid, api_name="/send")
    seen = [text_of(out[1][-1]) for out in job if out[1] and out[1][-1]["role"] == "assistant"]
    assert len(seen) >= 3 and len(set(seen)) >= 2


def test_openai_api_through_llamacpp(llamacpp_app):
    client = openai.OpenAI(base_url=f"{llamacpp_app.base_url}/v1", api_key=llamacpp_app.api_key)
    reply = client.chat.completions.create(
        model="upc",
        messages=[{"role": "user", "content": "Hello, I grow tomatoes."}],
        max_tokens=12,
    )
    assert reply.choices[0].message.content and 0 < reply.usage.completion_tokens <= 12
    chunks = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Say something about tomatoes."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in chunks:
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) >= 2 and usage is not None and usage.completion_tokens > 0
    # A history longer than the 1024-token window is cut to fit, not refused.
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(30):
        turns += [
            {"role": "user", "content": f"Message {i}: I love long walks along the coast " * 3},
            {"role": "assistant", "content": f"Answer {i}: the coast is lovely in autumn " * 3},
        ]
    turns.append({"role": "user", "content": "Where should I walk next?"})
    long = client.chat.completions.create(model="upc", messages=turns, max_tokens=8)
    assert long.choices[0].message.content and long.usage.prompt_tokens <= 1024 - 8
