"""One typed settings object, read from an optional TOML file and `UPC_*` env vars.

Env vars override the file. Top-level fields are `UPC_<FIELD>`; fields of a section are
`UPC_<SECTION>__<FIELD>` (e.g. `UPC_CHATBOT__MODEL`, `UPC_CRITIC__BACKEND`). A few short
aliases exist for common settings (`UPC_CHROMA_URL`, `UPC_MODEL`).
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

__all__ = [
    "EMBEDDED_MODEL",
    "AuthSettings",
    "GenerationSettings",
    "LearnerSettings",
    "LimitSettings",
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

    backend: Literal["local", "openai"] = "local"
    # HF id, local directory, or the embedded SmolLM2 (materialized under the data dir).
    model: str = EMBEDDED_MODEL
    base_url: str | None = None
    # Name of the env var holding the API key; the key itself never enters settings.
    api_key_env: str = "OPENAI_API_KEY"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_in_4bit: bool = True  # only honoured on CUDA
    max_retries: int = 4
    concurrency: int = 8


@dataclass
class GenerationSettings:
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.15
    timeout_s: float = 120.0


@dataclass
class LimitSettings:
    max_message_chars: int = 4000
    queue_size: int = 16
    max_batch_size: int = 8
    batch_window_ms: int = 15
    history_turns: int = 12
    # Demo-mode rate limit: messages per minute per user (0 = unlimited).
    messages_per_minute: int = 0


@dataclass
class AuthSettings:
    mode: Literal["password", "anonymous"] = "password"
    # Comma-separated user names that get the operator console.
    admin_users: str = ""
    allow_signup: bool = True
    # Env var with the admin secret for demo mode (an admin password).
    admin_secret_env: str = "UPC_ADMIN_SECRET"
    session_secret_env: str = "UPC_SESSION_SECRET"


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    # Env var that holds the bearer key for the /v1 OpenAI-compatible API.
    api_key_env: str = "UPC_API_KEY"
    allowed_origins: str = ""


@dataclass
class MemorySettings:
    enabled: bool = True
    chroma_url: str | None = None
    extractor: Literal["auto", "llm", "rules"] = "auto"
    top_k: int = 5
    token_budget: int = 160
    dedup_threshold: float = 0.85


@dataclass
class LearnerSettings:
    # The training critic scores Algorithm 1's replies and the curriculum's selection.
    critic: Literal["rubric", "llm", "embedding"] = "rubric"
    # The evaluation critic: never seen by training or selection; its id is in every report.
    eval_critic: Literal["spc", "rubric", "llm", "embedding"] = "spc"
    # The gate's critic ("eval": the evaluation critic, on validation users).
    gate_critic: Literal["eval", "spc", "rubric", "llm", "embedding"] = "eval"
    # Plain resamples under the serving prompt, next to the critique-guided regenerations.
    best_of_n: int = 2
    # Each iteration retrains from the base on the cumulative selection, or continues.
    retrain_from: Literal["base", "parent"] = "base"
    holdout_ratio: float = 0.1
    # Never train on a reply the reply checks flag as unusable (cut off, feedback talk,
    # placeholders, role flip). The checks are English phrase lists: turn this off for
    # other languages, where they misfire.
    skip_flagged_targets: bool = True
    # A DPO pair (chosen = best attempt, rejected = worst) needs this mean-score gap.
    pair_min_gap: float = 1.0
    gate_seeds: int = 2
    # Critic-free checks may not regress more than this (relative) for a promotion.
    gate_tolerance: float = 0.10
    turns: int = 5
    max_regenerations: int = 3
    accept_threshold: int = 4
    alpha: int = 3
    beta: int = 2
    batch_size: int = 16
    scheduler_enabled: bool = True
    curriculum_interval_minutes: int = 0  # 0 = off
    critique_interval_minutes: int = 5
    retrain_min_examples: int = 64
    idle_minutes: int = 30
    real_data_ratio: float = 0.5
    gate_margin: float = 0.0
    gate_users: int = 10
    dpo: bool = False
    # Rank 16 keeps a 135M model's adapter under 25 MB (the paper's 64 suits a 32B base).
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    learning_rate: float = 2e-4
    max_grad_norm: float = 0.3
    epochs: int = 2
    warmup_ratio: float = 0.1
    max_seq_len: int = 1024
    # Per-turn examples are short: batches of 8, 2 epochs, warm-up 10% (capped at 100),
    # cosine decay; each iteration retrains from the base on the cumulative selection.
    train_batch_size: int = 8
    grad_accum_steps: int = 1
    max_warmup_steps: int = 100
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    dpo_learning_rate: float = 1e-5
    dpo_beta: float = 0.1
    gate_seed: int = 1234
    # Issue 7: the scheduler, learning from logged dialogues, the poisoning guard.
    curriculum_cron: str = ""  # crontab expression; when set it replaces the interval
    curriculum_users: int = 0  # users per scheduled iteration (0: the generator's default)
    retrain_check_minutes: int = 10
    scheduler_lease_seconds: int = 60
    scheduler_poll_seconds: float = 2.0
    misfire_grace_minutes: int = 60
    logged_max_conversations: int = 50  # per critique run
    guard_user_threshold: float = 0.3  # share of flagged user turns that excludes a user
    guard_min_user_turns: int = 3


@dataclass
class Settings:
    data_dir: Path = Path("./upc-data")
    mode: Literal["private", "demo"] = "private"
    log_level: str = "INFO"
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    chatbot: ModelRoleSettings = field(default_factory=ModelRoleSettings)
    critic: ModelRoleSettings = field(default_factory=ModelRoleSettings)
    user_sim: ModelRoleSettings = field(default_factory=ModelRoleSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    learner: LearnerSettings = field(default_factory=LearnerSettings)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "upc.db"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db_path}"

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


def _apply(target: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(target))
    known = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"unknown setting {prefix}{key}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SettingsError(f"{prefix}{key} must be a table")
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(target, key, _coerce(value, hints[key], f"{prefix}{key}"))


def _env_values(env: typing.Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in env.items():
        if name in _ALIASES:
            section, key = _ALIASES[name]
            values.setdefault(section, {})[key] = raw
            continue
        if not name.startswith("UPC_") or name in ("UPC_CONFIG",):
            continue
        path = name[4:].lower().split("__")
        if len(path) == 1:
            if path[0] in {f.name for f in dataclasses.fields(Settings)}:
                values[path[0]] = raw
        elif len(path) == 2:
            values.setdefault(path[0], {})[path[1]] = raw
    return values


def _apply_mode_defaults(settings: Settings, explicit: dict[str, Any]) -> None:
    """Demo mode changes defaults, never values an operator set explicitly."""
    if settings.mode != "demo":
        return
    defaults = {
        ("auth", "mode"): "anonymous",
        ("limits", "max_message_chars"): 1000,
        ("limits", "messages_per_minute"): 10,
        ("learner", "curriculum_interval_minutes"): 0,
    }
    for (section, key), value in defaults.items():
        if key not in explicit.get(section, {}):
            setattr(getattr(settings, section), key, value)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: typing.Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build settings: defaults < TOML file (`UPC_CONFIG` or argument) < env < overrides."""
    env = os.environ if env is None else env
    settings = Settings()
    explicit: dict[str, Any] = {}
    config_file = config_file or env.get("UPC_CONFIG")
    if config_file:
        path = Path(config_file)
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
        _apply(settings, file_values, "")
        _merge(explicit, file_values)
    env_values = _env_values(env)
    _apply(settings, env_values, "")
    _merge(explicit, env_values)
    nested_overrides: dict[str, Any] = {}
    for key, value in overrides.items():
        if "__" in key:
            section, sub = key.split("__", 1)
            nested_overrides.setdefault(section, {})[sub] = value
        else:
            nested_overrides[key] = value
    _apply(settings, nested_overrides, "")
    _merge(explicit, nested_overrides)
    _apply_mode_defaults(settings, explicit)
    _validate(settings)
    return settings


def _merge(into: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        else:
            into[key] = value


def _validate(settings: Settings) -> None:
    if not 1 <= settings.server.port <= 65535:
        raise SettingsError(f"server.port: {settings.server.port} is not a valid port")
    if settings.limits.max_message_chars < 1:
        raise SettingsError("limits.max_message_chars must be positive")
    if settings.limits.queue_size < 1:
        raise SettingsError("limits.queue_size must be positive")
    for role in ("chatbot", "critic", "user_sim"):
        role_settings: ModelRoleSettings = getattr(settings, role)
        if role_settings.backend == "openai" and not role_settings.base_url:
            raise SettingsError(f"{role}.base_url is required for the openai backend")


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
    # Report whether referenced secrets are present without revealing them.
    for role in ("chatbot", "critic", "user_sim"):
        env_name = getattr(settings, role).api_key_env
        result[role]["api_key"] = "***" if os.environ.get(env_name) else "(unset)"
    return result
