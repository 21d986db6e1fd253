"""The launched app over real HTTP: gradio_client for the UI handlers, openai for /v1."""

import httpx
import openai
import pytest
from gradio_client import Client

from core.openai_model import OpenAIModel
from core.types import ChatMessage, GenerationParams, ModelError

pytestmark = pytest.mark.slow


def _client(app):
    return Client(app.base_url, verbose=False)


def _new_browser(client: Client) -> tuple:
    """A first visit: the server issues the browser's id (a secret only it hands out)."""
    return client.predict("", api_name="/load")


def text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def test_bot_speaks_first_and_a_turn_is_stored(running_app):
    client = _client(running_app)
    bid, conversations, history, status, *_ = _new_browser(client)
    assert len(bid) >= 16 and conversations["value"]
    assert len(history) == 1 and history[0]["role"] == "assistant" and text_of(history[0])
    text, history, status, _ = client.predict(
        "Hi! I'm a pediatric nurse and I restore old motorbikes.",
        history,
        bid,
        api_name="/send",
    )
    assert text == "" and status == ""
    assert [m["role"] for m in history] == ["assistant", "user", "assistant"]
    assert text_of(history[2]).strip()
    # A new session of the same browser sees the same conversation (stored, not in memory).
    again = _client(running_app).predict(bid, api_name="/load")
    assert [text_of(m) for m in again[2]] == [text_of(m) for m in history]


def test_streaming_yields_growing_partial_replies(running_app):
    client = _client(running_app)
    bid, _, history, *_ = _new_browser(client)
    job = client.submit("Tell me about bread.", history, bid, api_name="/send")
    seen = [text_of(out[1][-1]) for out in job if out[1] and out[1][-1]["role"] == "assistant"]
    assert len(seen) >= 3, "expected several streamed updates"
    assert len(set(seen)) >= 2


def test_bad_input_is_refused_and_kept_in_the_box(running_app):
    client = _client(running_app)
    bid, _, history, *_ = _new_browser(client)
    for bad in ["   ", "x" * 4001, "nul\x00byte"]:
        _, new_history, status, _ = client.predict(bad, history, bid, api_name="/send")
        assert status.startswith("⚠️"), status
        assert len(new_history) == len(history)


def test_regenerate_and_new_conversation(running_app):
    client = _client(running_app)
    bid, _, history, *_ = _new_browser(client)
    _, history, _, _ = client.predict("I like chess.", history, bid, api_name="/send")
    new_history, status = client.predict(history, bid, api_name="/regenerate")
    assert status == "" and len(new_history) == len(history) == 3
    conversations, fresh, _ = client.predict(bid, api_name="/new_conversation")
    assert len(conversations["choices"]) == 2 and len(fresh) == 1


def test_other_browser_cannot_open_or_write_my_conversation(running_app):
    a = _client(running_app)
    bid_a, conv_a, history, *_ = _new_browser(a)
    _, history, _, _ = a.predict("my-canary-7781", history, bid_a, api_name="/send")
    b = _client(running_app)
    bid_b, conv_b, *_ = _new_browser(b)
    assert conv_b["value"] != conv_a["value"]
    assert all(c[1] != conv_a["value"] for c in conv_b["choices"])
    with pytest.raises(Exception, match=r"does not exist|not in the list of choices"):
        b.predict(conv_a["value"], bid_b, api_name="/open_conversation")
    mine, _ = a.predict(conv_a["value"], bid_a, api_name="/open_conversation")
    assert any("my-canary-7781" in text_of(m) for m in mine)


def test_openai_client_non_stream_and_stream(running_app):
    client = openai.OpenAI(base_url=f"{running_app.base_url}/v1", api_key=running_app.api_key)
    models = [m.id for m in client.models.list().data]
    assert "upc" in models and "base" in models
    reply = client.chat.completions.create(
        model="upc",
        messages=[{"role": "user", "content": "Hello, I grow tomatoes."}],
        max_tokens=12,
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    chunks = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Say something about tomatoes."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in chunks:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) >= 2 and usage is not None and usage.completion_tokens > 0


def test_api_refuses_bad_keys_bad_bodies_and_foreign_origins(running_app):
    url = f"{running_app.base_url}/v1/chat/completions"
    body = {"model": "upc", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {running_app.api_key}"}
    bad = httpx.post(url, json={"model": "upc", "messages": []}, headers=auth)
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    huge = {"model": "upc", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert httpx.post(url, json=huge, headers=auth).status_code == 400
    unknown = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(url, json=unknown, headers=auth).status_code == 404
    for origin in ("null", "https://evil.example"):
        r = httpx.post(url, json=body, headers={**auth, "Origin": origin})
        assert r.status_code == 403


def test_our_openai_backend_against_the_app_as_a_real_server(running_app):
    model = OpenAIModel(f"{running_app.base_url}/v1", "upc", api_key=running_app.api_key)
    params = GenerationParams(max_new_tokens=10, temperature=0.0)
    msgs = [ChatMessage("user", "Hi, I am a carpenter.")]
    done = model.generate(msgs, params)
    assert done.text and done.completion_tokens > 0
    stream = model.stream(msgs, params)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            final = stop.value
            break
    assert "".join(pieces).strip() == final.text and final.completion_tokens > 0
    batch = model.generate_batch([msgs, msgs], params)
    assert len(batch) == 2 and all(c.text for c in batch)
    wrong_key = OpenAIModel(f"{running_app.base_url}/v1", "upc", api_key="nope", max_retries=0)
    with pytest.raises(ModelError, match="401"):
        wrong_key.generate(msgs, params)
    dead = OpenAIModel("http://127.0.0.1:9/v1", "upc", max_retries=1)
    with pytest.raises(ModelError, match="cannot reach"):
        dead.generate(msgs, params)
