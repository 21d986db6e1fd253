"""Wires the app's components together from settings, with explicit arguments."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatbot.accounts import Accounts
from chatbot.adapters import AdapterManager, load_ab_split
from chatbot.chat import ChatService
from chatbot.downloads import Downloads
from chatbot.memory import MemoryService
from core.embeddings import Embedder
from core.engine_model import EngineModel
from core.llamacpp_model import LlamaCppModel
from core.runtime import ModelPool
from core.settings import Settings
from core.types import ChatModel, GenerationParams
from learner.registry import AdapterRegistry
from storage import Database

__all__ = [
    "Services",
    "browser_state_key",
    "build_services",
    "build_worker_memory",
    "context_window",
    "session_secret",
]

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    accounts: Accounts
    models: ModelPool
    chatbot_model: ChatModel
    chat: ChatService
    adapters: AdapterManager
    registry: AdapterRegistry
    embedder: Embedder | None = None
    memory: MemoryService | None = None
    # Export copies waiting for their one download through the authenticated route.
    downloads: Downloads = field(default_factory=Downloads)
    extras: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        self.adapters.stop()
        self.downloads.close()
        if self.memory is not None:
            self.memory.close()
        self.models.close()
        self.db.dispose()


def session_secret(settings: Settings) -> str:
    """A stable secret for browser-side state: env var, else a key file in the data dir."""
    from_env = os.environ.get(settings.auth.session_secret_env)
    if from_env:
        return from_env
    path: Path = settings.data_dir / "session.key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32), encoding="utf-8")
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


def browser_state_key(settings: Settings) -> str:
    """The key Gradio encrypts the browser's stored state with.

    Gradio hands this key to every browser (in /config), so it must not be the session
    secret itself: it is derived from it, one way, and stays stable across restarts.
    """
    secret = session_secret(settings).encode("utf-8")
    return hmac.new(secret, b"upc browser-state key v1", hashlib.sha256).hexdigest()[:32]


def _ensure_admins(settings: Settings, accounts: Accounts) -> None:
    """Create listed admins that have no account from the admin password in the env."""
    if settings.auth.mode != "password" or not settings.admin_user_names:
        return
    made = accounts.ensure_admins(os.environ.get(settings.auth.admin_password_env))
    if made:
        log.info("created admin account(s) %s", ", ".join(made))
    missing = [n for n in sorted(settings.admin_user_names) if accounts.by_name(n) is None]
    if missing:
        log.warning(
            "admin name(s) %s have no account and can't be claimed by sign-up: create them "
            "with `upc users add NAME --admin`, or set %s before the first start",
            ", ".join(missing),
            settings.auth.admin_password_env,
        )


def context_window(settings: Settings, model: ChatModel) -> int:
    """Tokens a prompt and its reply may take: the setting, or the model's own if smaller."""
    own = getattr(model, "context_tokens", None)
    return min(settings.limits.context_tokens, own) if own else settings.limits.context_tokens


def generation_params(settings: Settings) -> GenerationParams:
    return settings.generation.params()


def _build_memory(
    settings: Settings, db: Database, chatbot_model: ChatModel, embedder: Embedder
) -> MemoryService | None:
    if not settings.memory.enabled:
        return None
    # A remote (capable) chat model extracts facts; the embedded 135M model uses the rules.
    llm = chatbot_model if settings.chatbot.backend == "openai" else None
    count_tokens = None
    tokenizer = getattr(chatbot_model, "tokenizer", None)
    if tokenizer is not None:

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return MemoryService.from_settings(settings, db, embedder, llm=llm, count_tokens=count_tokens)


def build_worker_memory(settings: Settings, db: Database) -> MemoryService | None:
    """The memory service a `upc worker` gives the critic for user profiles, or None when
    memory is off or cannot start (the critic then falls back to the dialogue)."""
    if not settings.memory.enabled:
        return None
    try:
        return MemoryService.from_settings(settings, db, Embedder())
    except Exception as exc:  # profiles are optional
        log.warning("memory service unavailable in the worker (%s); critic uses dialogues", exc)
        return None


def _adapter_files(model: ChatModel, registry: AdapterRegistry) -> Callable[[str], Path]:
    """Where the served model finds a verified adapter: llama.cpp its GGUF LoRA (converted
    into the registry once if the adapter has none yet), torch the adapter directory."""
    if isinstance(model, LlamaCppModel):
        return lambda adapter_id: registry.gguf_path(adapter_id, base_config=model.gguf_path)
    if isinstance(model, EngineModel) and model.engine == "llamacpp":
        return registry.gguf_path  # an engine's own base is not here to check against
    return registry.verified_path


def build_services(settings: Settings, *, chatbot_model: ChatModel | None = None) -> Services:
    db = Database.from_settings(settings)
    accounts = Accounts(db, admin_names=settings.admin_user_names)
    _ensure_admins(settings, accounts)
    models = ModelPool(settings)
    model = chatbot_model or models.get(settings.chatbot)
    registry = AdapterRegistry(settings.adapters_dir, db)
    adapters = AdapterManager(
        model,
        source=registry.active_id,
        resolve=_adapter_files(model, registry),
        ab_source=lambda: load_ab_split(settings.adapters_dir),
        on_failure=lambda wanted, serving, exc: registry.revert_failed(wanted, serving, str(exc)),
        prepare_source=registry.newest_candidates,
    )
    embedder = Embedder()
    memory = _build_memory(settings, db, model, embedder)
    chat = ChatService(
        db,
        model,
        params=generation_params(settings),
        max_message_chars=settings.limits.max_message_chars,
        history_turns=settings.limits.history_turns,
        messages_per_minute=settings.limits.messages_per_minute,
        address_messages_per_minute=settings.limits.address_messages_per_minute,
        adapter_for=adapters.adapter_for,
        memory=memory,
        memory_top_k=settings.memory.top_k,
        memory_token_budget=settings.memory.token_budget,
        context_tokens=context_window(settings, model),
    )
    chat.mark_interrupted_streams()
    adapters.start()
    return Services(
        settings=settings,
        db=db,
        accounts=accounts,
        models=models,
        chatbot_model=model,
        chat=chat,
        adapters=adapters,
        embedder=embedder,
        memory=memory,
        registry=registry,
        downloads=Downloads(settings.console_downloads_dir),
    )
