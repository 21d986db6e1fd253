"""Probes 3 and 17 of issue 16: broken adapters never reach the model, and a failed load
leaves the model serving exactly what it served, with ACTIVE pointing back at it."""

from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from tests.security.conftest import cli, stop_and_clean, tiny_app

pytestmark = pytest.mark.slow


class _Payload:
    """Makes a directory when unpickled: proof that a pickle was (or was not) opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.mkdir, (self.marker,))


def _save_lora(model, out: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)


def make_adapters(root: Path, model_dir: Path) -> dict[str, Path]:
    """A good LoRA for the tiny model, one for a narrower model (valid files that can't
    load), a truncated copy of the good one and a copy with a suffix-less pickle."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    out = {name: root / name for name in ("good", "wrong-base", "truncated", "pickled")}
    _save_lora(AutoModelForCausalLM.from_pretrained(model_dir), out["good"], seed=1)
    narrow = AutoConfig.from_pretrained(model_dir)
    narrow.hidden_size, narrow.intermediate_size = 32, 64
    _save_lora(LlamaForCausalLM(narrow), out["wrong-base"], seed=2)
    shutil.copytree(out["good"], out["truncated"])
    weights = out["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    shutil.copytree(out["good"], out["pickled"])
    (out["pickled"] / "payload").write_bytes(pickle.dumps(_Payload(root / "pwned")))
    return out


@pytest.fixture(scope="module")
def adapter_app(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sec-adapters")
    app = tiny_app(root, tiny_model_dir, UPC_AUTH__MODE="anonymous")
    app.extra["adapters"] = make_adapters(root, tiny_model_dir)
    app.start()
    yield app
    stop_and_clean(app, root)


def _reply(app) -> str:
    """The served model's greedy reply to a fixed prompt, through /v1."""
    r = httpx.post(
        f"{app.base_url}/v1/chat/completions",
        json={
            "model": "upc",
            "messages": [{"role": "user", "content": "Tell me about bees."}],
            "max_tokens": 8,
            "temperature": 0,
            "seed": 7,
        },
        headers={"Authorization": f"Bearer {app.api_key}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _served(app) -> str:
    return httpx.get(f"{app.base_url}/healthz", timeout=30).json()["adapter"]


def _active_file(app) -> str:
    return (app.data_dir / "adapters" / "ACTIVE").read_text().strip()


def _wait_until(check, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def _chat_works(app) -> None:
    chat = Client(app.base_url, verbose=False)
    bid, _, history, *_ = chat.predict("", api_name="/load")
    _, history, status, _ = chat.predict("hello there", history, bid, api_name="/send")
    assert status == "" and history[-1]["role"] == "assistant"


def test_probe3_and_17_broken_adapters_are_refused_at_the_registry(adapter_app):
    adapters = adapter_app.extra["adapters"]
    truncated = cli(adapter_app, "adapters", "import", str(adapters["truncated"]), "--id", "cut")
    assert truncated.returncode != 0 and "truncated" in truncated.stderr
    pickled = cli(adapter_app, "adapters", "import", str(adapters["pickled"]), "--id", "pkl")
    assert pickled.returncode != 0 and "payload" in pickled.stderr
    assert not (adapters["pickled"].parent / "pwned").exists()
    listed = cli(adapter_app, "adapters", "list")
    assert listed.returncode == 0 and "cut" not in listed.stdout and "pkl" not in listed.stdout


def test_probe3_a_failed_load_changes_nothing_and_active_rolls_back(adapter_app):
    app, adapters = adapter_app, adapter_app.extra["adapters"]
    for name in ("good", "wrong-base"):
        made = cli(app, "adapters", "import", str(adapters[name]), "--id", name)
        assert made.returncode == 0, made.stderr
    base_reply = _reply(app)

    # First adapter ever, and it can't load: the plain model must come out untouched.
    assert cli(app, "adapters", "activate", "wrong-base").returncode == 0
    _wait_until(lambda: _active_file(app) == "base")
    assert _served(app) == "base" and _reply(app) == base_reply
    _chat_works(app)

    assert cli(app, "adapters", "activate", "good").returncode == 0
    _wait_until(lambda: _served(app) == "good")
    good_reply = _reply(app)

    # Next to a loaded adapter: the good one keeps serving.
    assert cli(app, "adapters", "activate", "wrong-base").returncode == 0
    _wait_until(lambda: _active_file(app) == "good")
    assert _served(app) == "good" and _reply(app) == good_reply
    _chat_works(app)
    shown = cli(app, "adapters", "show", "wrong-base")
    assert "failed to load" in shown.stdout
