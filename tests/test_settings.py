from pathlib import Path

import pytest

from core.settings import SettingsError, load_settings, masked_dict


def test_defaults_are_the_embedded_model_and_local_port():
    s = load_settings(env={})
    assert s.server.host == "127.0.0.1" and s.server.port == 7860
    assert s.chatbot.model.startswith("embedded:")
    assert s.data_dir == Path("./upc-data")
    assert s.limits.max_message_chars == 4000
    assert s.server.share is False


def test_toml_then_env_then_overrides(tmp_path):
    cfg = tmp_path / "upc.toml"
    cfg.write_text(
        'data_dir = "/srv/upc"\n[server]\nport = 9000\n[generation]\ntemperature = 0.2\n'
    )
    s = load_settings(cfg, env={"UPC_SERVER__PORT": "9100", "UPC_CHATBOT__MODEL": "org/model"})
    assert s.data_dir == Path("/srv/upc")
    assert s.server.port == 9100  # env beats the file
    assert s.generation.temperature == 0.2
    assert s.chatbot.model == "org/model"
    s2 = load_settings(cfg, env={}, server__port=9200)
    assert s2.server.port == 9200


def test_demo_mode_defaults_do_not_override_explicit_values():
    s = load_settings(env={"UPC_MODE": "demo"})
    assert s.auth.mode == "anonymous" and s.limits.messages_per_minute > 0
    s2 = load_settings(env={"UPC_MODE": "demo", "UPC_AUTH__MODE": "password"})
    assert s2.auth.mode == "password"


@pytest.mark.parametrize(
    "env",
    [
        {"UPC_SERVER__PORT": "seventy"},
        {"UPC_SERVER__PORT": "70000"},
        {"UPC_AUTH__MODE": "magic"},
        {"UPC_SERVER__NOPE": "1"},
        {"UPC_CHATBOT__BACKEND": "openai"},  # needs a base_url
    ],
)
def test_bad_values_are_refused_with_the_setting_named(env):
    with pytest.raises(SettingsError):
        load_settings(env=env)


def test_broken_toml_is_a_clear_error(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server\nport=")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(cfg, env={})


def test_masked_settings_hide_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-value-123456")
    s = load_settings(env={})
    dumped = str(masked_dict(s))
    assert "sk-very-secret" not in dumped
    assert masked_dict(s)["chatbot"]["api_key"] == "***"
    assert masked_dict(s)["generation"]["max_new_tokens"] == s.generation.max_new_tokens
