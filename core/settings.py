"""One typed settings object, read from an optional TOML file and `UPC_*` env vars.

Env vars override the file. Top-level fields are `UPC_<FIELD>`; fields of a section are
`UPC_<SECTION>__<FIELD>` (e.g. `UPC_CHATBOT__MODEL`, `UPC_CRITIC__BACKEND`). A few short
aliases exist for common settings (`UPC_CHROMA_URL`, `UPC_MODEL`).

The database is SQLite under the data dir unless `UPC_DATABASE_URL` names another
(any SQLAlchemy URL; `postgresql://...` uses psycopg 3).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from core.learner_settings.critics import CriticSettings
from core.learner_settings.gate import GateSettings
from core.learner_settings.generate import GenerateSettings
from core.learner_settings.logged import LoggedSettings
from core.learner_settings.schedule import ScheduleSettings
from core.learner_settings.select import SelectSettings
from core.learner_settings.train import TrainSettings
from core.types import GenerationParams

__all__ = [
    "EMBEDDED_MODEL",
    "AuthSettings",
    "GenerationSettings",
    "LearnerSettings",
    "LimitSettings",
    "LlamaCppSettings",
    "MemorySettings",
    "ModelRoleSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "load_settings",
    "masked_dict",
]

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"

_ALIASES = {
    "UPC_CHROMA_URL": ("memory", "chroma_url"),
    "UPC_MODEL": ("chatbot", "model"),
    "UPC_HOST": ("server", "host"),
    "UPC_PORT": ("server", "port"),
}
_SECRET_SUFFIXES = ("key", "secret", "password", "_token")


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


@dataclass
class ModelRoleSettings:
    """Which model plays one role (chatbot, critic, simulated user, extractor)."""

    # local: transformers (torch); llamacpp: a GGUF through llama.cpp's server; openai: any
    # OpenAI-compatible endpoint; auto: llamacpp on a CPU when xllamacpp imports and the model
    # has a GGUF, else local (`core.runtime.pick_backend` logs which and why).
    backend: Literal["auto", "local", "llamacpp", "openai"] = "local"
    # HF id, local directory, or the embedded SmolLM2 (materialized under the data dir).
    model: str = EMBEDDED_MODEL
    base_url: str | None = None
    # Name of the env var holding the API key; the key itself never enters settings.
    api_key_env: str = "OPENAI_API_KEY"
    device: str = "auto"
    # float64 is a reference precision: the same tokens whatever the batch layout.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    load_in_4bit: bool = True  # only honoured on CUDA
    max_retries: int = 4
    concurrency: int = 8
    # The openai backend's engine when it takes LoRA adapters at run time, so promotion
    # pushes them there (core.engine_model): "llamacpp" or "vllm"; empty: none.
    engine: Literal["", "llamacpp", "vllm"] = ""
    # The adapter store as the engine sees it (another host or container); empty: the
    # same paths as this process.
    engine_adapter_dir: str = ""


@dataclass
class LlamaCppSettings:
    """The llama.cpp backend (`backend = "llamacpp"` or `"auto"` on a CPU)."""

    # A GGUF file to serve; empty: the model's own (the embedded model's shipped Q4_1, a
    # `.gguf` model path, or the single `.gguf` file in the model's directory).
    gguf: str = ""
    # Requests decoding at once (llama.cpp's slots, batched together every step).
    n_parallel: int = 4
    # The context window of one request (each slot's), prompt and reply together.
    ctx_tokens: int = 4096
    # CPU threads for decoding; 0: all cores.
    threads: int = 0
    # Host memory for cached prompt prefixes of idle conversations.
    cache_ram_mib: int = 256
    # Seconds a llama.cpp server may take to load the model and its adapters.
    start_timeout_s: float = 120.0


@dataclass
class GenerationSettings:
    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.15
    timeout_s: float = 120.0

    def params(self, **overrides: Any) -> GenerationParams:
        """The serving sampling parameters (the one place they are made from settings)."""
        values = dataclasses.asdict(self)
        values.update(overrides)
        return GenerationParams(**values)


@dataclass
class LimitSettings:
    max_message_chars: int = 4000
    queue_size: int = 16
    max_batch_size: int = 8
    batch_window_ms: int = 15
    history_turns: int = 12
    # Demo-mode rate limit: messages (sends and regenerations) per minute per user, and per
    # client address, which a visitor can't reset by starting a new identity (0 = unlimited).
    messages_per_minute: int = 0
    address_messages_per_minute: int = 0
    # The model's context window: every prompt is cut to fit it with room for the reply.
    context_tokens: int = 8192
    # The most messages one /v1 request may carry.
    api_max_messages: int = 64


@dataclass
class AuthSettings:
    mode: Literal["password", "anonymous"] = "password"
    # Comma-separated user names that get the operator console.
    admin_users: str = ""
    allow_signup: bool = True
    # Env var with the admin secret for demo mode (an admin password).
    admin_secret_env: str = "UPC_ADMIN_SECRET"
    session_secret_env: str = "UPC_SESSION_SECRET"
    # Env var with the password the listed admins get at first start when they have no
    # account (sign-up can never claim an admin name).
    admin_password_env: str = "UPC_ADMIN_PASSWORD"
    # Sign-in throttle: failures allowed before a wait, per account and per client address;
    # the wait starts at `login_backoff_s` and doubles with each further failure.
    login_free_failures: int = 5
    login_ip_free_failures: int = 20
    login_backoff_s: float = 2.0
    login_backoff_max_s: float = 900.0
    # A signed-in session (kept in the database, shared by every replica) ends after this.
    session_max_age_h: float = 720.0


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    # Env var that holds the bearer key for the /v1 OpenAI-compatible API.
    api_key_env: str = "UPC_API_KEY"
    allowed_origins: str = ""
    # Host names the server answers to (comma-separated), besides the bind address,
    # localhost and 127.0.0.1; any other Host header gets 403 (DNS rebinding).
    allowed_hosts: str = ""
    # Proxies whose X-Forwarded-For names the real client (uvicorn's forwarded_allow_ips);
    # rate limits and the sign-in throttle key on that address.
    trusted_proxies: str = "127.0.0.1"
    # On SIGTERM, open connections (streams, idle event channels) get this long to finish;
    # a reply cut here is kept as interrupted. Without a bound, one idle client stalls exit.
    shutdown_grace_s: float = 5.0


@dataclass
class MemorySettings:
    enabled: bool = True
    chroma_url: str | None = None
    # After a Chroma fault, recall runs on the database alone for this long before the next
    # reconnect attempt; a reconnect re-indexes whatever was written meanwhile.
    retry_interval_s: float = 30.0
    # A Chroma server's requests give up after this long (its client waits forever).
    chroma_timeout_s: float = 10.0
    extractor: Literal["auto", "llm", "rules"] = "auto"
    top_k: int = 5
    token_budget: int = 160
    dedup_threshold: float = 0.85


@dataclass
class LearnerSettings:
    """The learning loop's settings, one component per stage or job (`core.learner_settings`).

    A flat key still names its field wherever it lives: `UPC_LEARNER__GATE_MARGIN` and
    `[learner] gate_margin` set `learner.gate.gate_margin`, as does `[learner.gate]`.
    """

    critics: CriticSettings = field(default_factory=CriticSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    select: SelectSettings = field(default_factory=SelectSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    logged: LoggedSettings = field(default_factory=LoggedSettings)


@dataclass
class Settings:
    data_dir: Path = Path("./upc-data")
    # Any SQLAlchemy URL (`UPC_DATABASE_URL`); unset means SQLite at `data_dir/upc.db`.
    database_url: str | None = None
    mode: Literal["private", "demo"] = "private"
    log_level: str = "INFO"
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    chatbot: ModelRoleSettings = field(default_factory=lambda: ModelRoleSettings(backend="auto"))
    critic: ModelRoleSettings = field(default_factory=ModelRoleSettings)
    user_sim: ModelRoleSettings = field(default_factory=ModelRoleSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    llamacpp: LlamaCppSettings = field(default_factory=LlamaCppSettings)
    learner: LearnerSettings = field(default_factory=LearnerSettings)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "upc.db"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.db_path}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def chroma_dir(self) -> Path:
        return self.data_dir / "chroma"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def console_downloads_dir(self) -> Path:
        """Export copies waiting for their one-time console download (`chatbot.downloads`)."""
        return self.data_dir / "console-downloads"

    @property
    def admin_user_names(self) -> frozenset[str]:
        return frozenset(n.strip() for n in self.auth.admin_users.split(",") if n.strip())


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        empty = value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))
        if empty and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            raise SettingsError(f"{name}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}: {value!r} is not a boolean")
    if annotation in (int, float):
        try:
            return annotation(value)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{name}: {value!r} is not a {annotation.__name__}") from exc
    if annotation is Path:
        return Path(value).expanduser()
    if annotation is str:
        return str(value)
    return value


SettingPath = tuple[str, ...]


def _components(target: Any) -> dict[str, str]:
    """For a section made only of components (`learner`): field name -> its component, so a
    flat key still finds its field. Field names are unique across the components."""
    sections = [getattr(target, f.name) for f in dataclasses.fields(target)]
    if not all(dataclasses.is_dataclass(s) for s in sections):
        return {}
    return {
        inner.name: f.name
        for f in dataclasses.fields(target)
        for inner in dataclasses.fields(getattr(target, f.name))
    }


def _apply(
    target: Any, values: dict[str, Any], path: SettingPath, applied: set[SettingPath]
) -> None:
    """Set ``values`` on ``target``; record the full path of every field set in ``applied``."""
    hints = typing.get_type_hints(type(target))
    known = {f.name for f in dataclasses.fields(target)}
    components = _components(target)
    for key, value in values.items():
        name = ".".join((*path, key))
        if key not in known:
            if key not in components:
                raise SettingsError(f"unknown setting {name}")
            _apply(
                getattr(target, components[key]), {key: value}, (*path, components[key]), applied
            )
            continue
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SettingsError(f"{name} must be a table")
            _apply(current, value, (*path, key), applied)
        else:
            setattr(target, key, _coerce(value, hints[key], name))
            applied.add((*path, key))


def _nest(values: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        values = values.setdefault(part, {})
    values[path[-1]] = value


def _env_values(env: typing.Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in env.items():
        if name in _ALIASES:
            _nest(values, list(_ALIASES[name]), raw)
            continue
        if not name.startswith("UPC_") or name in ("UPC_CONFIG",):
            continue
        path = name[4:].lower().split("__")
        if len(path) > 1 or path[0] in {f.name for f in dataclasses.fields(Settings)}:
            _nest(values, path, raw)
    return values


def _apply_mode_defaults(settings: Settings, explicit: set[SettingPath]) -> None:
    """Demo mode changes defaults, never values an operator set explicitly."""
    if settings.mode != "demo":
        return
    defaults: dict[SettingPath, Any] = {
        ("auth", "mode"): "anonymous",
        ("limits", "max_message_chars"): 1000,
        ("limits", "messages_per_minute"): 10,
        ("limits", "address_messages_per_minute"): 30,
        ("learner", "schedule", "curriculum_interval_minutes"): 0,
    }
    for path, value in defaults.items():
        if path not in explicit:
            section = settings
            for part in path[:-1]:
                section = getattr(section, part)
            setattr(section, path[-1], value)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: typing.Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build settings: defaults < TOML file (`UPC_CONFIG` or argument) < env < overrides.

    An override's key is a path with `__` (`learner__gate_margin=0.1`), like the env vars.
    """
    env = os.environ if env is None else env
    settings = Settings()
    explicit: set[SettingPath] = set()
    config_file = config_file or env.get("UPC_CONFIG")
    if config_file:
        path = Path(config_file)
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
        _apply(settings, file_values, (), explicit)
    _apply(settings, _env_values(env), (), explicit)
    nested_overrides: dict[str, Any] = {}
    for key, value in overrides.items():
        _nest(nested_overrides, key.split("__"), value)
    _apply(settings, nested_overrides, (), explicit)
    _apply_mode_defaults(settings, explicit)
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    if not 1 <= settings.server.port <= 65535:
        raise SettingsError(f"server.port: {settings.server.port} is not a valid port")
    if settings.limits.max_message_chars < 1:
        raise SettingsError("limits.max_message_chars must be positive")
    if settings.limits.queue_size < 1:
        raise SettingsError("limits.queue_size must be positive")
    if settings.limits.context_tokens <= settings.generation.max_new_tokens:
        raise SettingsError("limits.context_tokens must exceed generation.max_new_tokens")
    if settings.limits.api_max_messages < 1:
        raise SettingsError("limits.api_max_messages must be positive")
    if settings.database_url is not None and "://" not in settings.database_url:
        raise SettingsError(
            "database_url must be an SQLAlchemy URL such as postgresql://user@host/db"
        )
    if settings.memory.retry_interval_s < 0:
        raise SettingsError("memory.retry_interval_s must not be negative")
    if settings.memory.chroma_timeout_s <= 0:
        raise SettingsError("memory.chroma_timeout_s must be positive")
    llamacpp = settings.llamacpp
    if llamacpp.n_parallel < 1 or llamacpp.threads < 0:
        raise SettingsError("llamacpp.n_parallel must be positive and llamacpp.threads >= 0")
    if llamacpp.ctx_tokens <= settings.generation.max_new_tokens:
        raise SettingsError("llamacpp.ctx_tokens must exceed generation.max_new_tokens")
    train = settings.learner.train
    if train.epochs < 0 or train.dpo_length_alpha < 0:
        raise SettingsError("learner.epochs and learner.dpo_length_alpha must not be negative")
    if train.epochs == 0 and not train.dpo:
        raise SettingsError("learner.epochs = 0 trains DPO alone: set learner.dpo = true")
    for role in ("chatbot", "critic", "user_sim"):
        role_settings: ModelRoleSettings = getattr(settings, role)
        if role_settings.backend == "openai" and not role_settings.base_url:
            raise SettingsError(f"{role}.base_url is required for the openai backend")
        if role_settings.engine and role_settings.backend != "openai":
            raise SettingsError(f"{role}.engine needs {role}.backend = openai")


def _without_password(url: str) -> str:
    """The URL with any password replaced by `***` (URLs carry credentials)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def masked_dict(settings: Settings) -> dict[str, Any]:
    """The effective settings as a dict, with anything secret-looking masked."""

    def mask(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            out = {}
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                secret = f.name.endswith(_SECRET_SUFFIXES)
                out[f.name] = "***" if secret and value else mask(value)
            return out
        if isinstance(obj, Path):
            return str(obj)
        return obj

    result = mask(settings)
    if settings.database_url:
        result["database_url"] = _without_password(settings.database_url)
    # Report whether referenced secrets are present without revealing them.
    for role in ("chatbot", "critic", "user_sim"):
        env_name = getattr(settings, role).api_key_env
        result[role]["api_key"] = "***" if os.environ.get(env_name) else "(unset)"
    return result
