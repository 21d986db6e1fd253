import dataclasses
from pathlib import Path

import pytest

from core.settings import LearnerSettings, SettingsError, load_settings, masked_dict
from core.types import GenerationParams


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


def test_flat_learner_keys_land_in_their_component(tmp_path):
    """`UPC_LEARNER__<FIELD>` and `[learner] <field>` keep working after the split into
    components; the component path works too, and a wrong key is still refused."""
    cfg = tmp_path / "upc.toml"
    cfg.write_text("[learner]\nalpha = 2\n[learner.train]\nlora_rank = 4\n")
    s = load_settings(
        cfg,
        env={
            "UPC_LEARNER__GATE_MARGIN": "-5",
            "UPC_LEARNER__TURNS": "3",
            "UPC_LEARNER__CRITIC": "llm",
            "UPC_LEARNER__SCHEDULE__CRITIQUE_INTERVAL_MINUTES": "9",
        },
        learner__real_data_ratio=0.25,
    )
    assert s.learner.gate.gate_margin == -5.0 and s.learner.generate.turns == 3
    assert s.learner.critics.critic == "llm" and s.learner.select.alpha == 2
    assert s.learner.train.lora_rank == 4 and s.learner.logged.real_data_ratio == 0.25
    assert s.learner.schedule.critique_interval_minutes == 9
    assert masked_dict(s)["learner"]["gate"]["gate_margin"] == -5.0
    with pytest.raises(SettingsError, match=r"learner\.nope"):
        load_settings(env={"UPC_LEARNER__NOPE": "1"})
    with pytest.raises(SettingsError, match=r"learner\.gate\.turns"):
        load_settings(env={"UPC_LEARNER__GATE__TURNS": "3"})


def test_learner_field_names_are_unique_across_components():
    names = [
        inner.name
        for component in dataclasses.fields(LearnerSettings)
        for inner in dataclasses.fields(getattr(LearnerSettings(), component.name))
    ]
    assert len(names) == len(set(names)) == 57


def test_demo_mode_turns_the_curriculum_off_unless_set():
    assert load_settings(env={"UPC_MODE": "demo"}).learner.schedule.curriculum_interval_minutes == 0
    explicit = {"UPC_MODE": "demo", "UPC_LEARNER__CURRICULUM_INTERVAL_MINUTES": "30"}
    assert load_settings(env=explicit).learner.schedule.curriculum_interval_minutes == 30


def test_generation_params_come_from_the_generation_settings():
    s = load_settings(env={"UPC_GENERATION__TOP_P": "0.8", "UPC_GENERATION__TIMEOUT_S": "5"})
    params = s.generation.params()
    assert params == GenerationParams(
        max_new_tokens=160, temperature=0.7, top_p=0.8, repetition_penalty=1.15, timeout_s=5.0
    )
    assert s.generation.params(max_new_tokens=64).max_new_tokens == 64


def test_dpo_alone_needs_dpo_and_lengths_are_not_negative():
    with pytest.raises(SettingsError, match="DPO alone"):
        load_settings(env={"UPC_LEARNER__EPOCHS": "0"})
    with pytest.raises(SettingsError, match="must not be negative"):
        load_settings(env={"UPC_LEARNER__DPO_LENGTH_ALPHA": "-0.1"})
    alone = load_settings(env={"UPC_LEARNER__EPOCHS": "0", "UPC_LEARNER__DPO": "true"})
    assert alone.learner.train.epochs == 0 and alone.learner.train.dpo
