"""Shared fixtures: the real embedded model, tiny random models, temp data dirs, a live app."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.servers import ChromaServer, PostgresCluster, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

REPO = Path(__file__).resolve().parents[1]

# The slowest files (`--durations`, 2026-12-01), handed out first: with two xdist workers
# taking whole files, a long file left to the end keeps one core idle while it runs.
_SLOW_FILES_FIRST = (
    "test_learning_e2e.py",
    "test_fuzz.py",
    "test_gguf_lora.py",
    "test_critic.py",
    "test_shared_sessions.py",
    "test_llamacpp_adapters.py",
    "test_distributed.py",
    "test_replicas.py",
    "test_kill9.py",
    "test_probes.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, materialized from the wheel's GGUF once per run.

    `UPC_TEST_MODELS_DIR` may point at a directory to reuse between runs.
    """
    # Not at the top: the offline environment above must be set before the model stack loads.
    from core.runtime import ensure_embedded_model

    root = os.environ.get("UPC_TEST_MODELS_DIR")
    models_dir = Path(root) if root else tmp_path_factory.mktemp("models")
    return ensure_embedded_model(models_dir)


def make_tiny_model(path: Path, tokenizer_dir: Path) -> Path:
    """A randomly initialised 2-layer Llama with the real SmolLM2 tokenizer, saved at `path`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir) -> Path:
    """A randomly initialised 2-layer Llama with the real SmolLM2 tokenizer (fast mechanics)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), embedded_model_dir)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "upc-data"


@pytest.fixture
def seeded_data_dir(data_dir, embedded_model_dir) -> Path:
    """A data dir whose models/ already holds the embedded model (skips re-conversion)."""
    target = data_dir / "models" / embedded_model_dir.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(embedded_model_dir, target)
    return data_dir


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster for the run, started by the first test that needs it."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, data_dir) -> str:
    """The database of one test: SQLite in its data dir, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{data_dir}/upc.db"
        return
    cluster = request.getfixturevalue("postgres")
    url = cluster.create_database()
    yield url
    cluster.drop_database(url)


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory):
    """A real `chroma run` server on a free port for the run (tests may stop and restart it)."""
    server = ChromaServer(tmp_path_factory.mktemp("chroma-server")).start()
    yield server
    server.stop()


@dataclass
class RunningApp:
    base_url: str
    api_key: str
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    def start(self, timeout_s: float = 240.0) -> None:
        assert self.log_path is not None
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "app.py")],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"app did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


def make_app(data_dir: Path, log_dir: Path, **env_overrides: str) -> RunningApp:
    port = free_port()
    api_key = "test-key-" + os.urandom(6).hex()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("UPC_")},
        "UPC_DATA_DIR": str(data_dir),
        "UPC_PORT": str(port),
        "UPC_API_KEY": api_key,
        "UPC_GENERATION__MAX_NEW_TOKENS": "24",
        "UPC_LEARNER__SCHEDULER_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
        **env_overrides,
    }
    return RunningApp(
        base_url=f"http://127.0.0.1:{port}",
        api_key=api_key,
        data_dir=data_dir,
        env=env,
        log_path=log_dir / f"app-{port}.log",
    )


def embedded_app(root: Path, embedded_model_dir: Path, **env: str) -> Iterator[RunningApp]:
    """A started app on the embedded model in `root` (a fixture's body: yields it, then
    stops it and removes `root` unless UPC_KEEP_TEST_LOGS is set)."""
    data_dir = root / "upc-data"
    (data_dir / "models").mkdir(parents=True)
    os.symlink(embedded_model_dir, data_dir / "models" / embedded_model_dir.name)
    app = make_app(data_dir, root, **env)
    app.start()
    yield app
    app.stop()
    if os.environ.get("UPC_KEEP_TEST_LOGS") is None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def running_app(tmp_path_factory, embedded_model_dir):
    """The real app (embedded model) on localhost, anonymous auth, shared by API tests."""
    root = tmp_path_factory.mktemp("running-app")
    yield from embedded_app(root, embedded_model_dir, UPC_AUTH__MODE="anonymous")
