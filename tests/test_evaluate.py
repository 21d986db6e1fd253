"""`upc eval` end to end on a tiny random model: 3 users, base vs a published LoRA adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from chatbot.cli import main
from chatbot.settings import load_settings
from learner.eval_cli import select_personas
from learner.evaluate import SystemSpec, parse_systems
from learner.registry import AdapterManifest, AdapterRegistry
from storage.db import Database

ADAPTER_ID = "eval-lora"


@pytest.fixture
def config_file(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> Path:
    for key in [k for k in os.environ if k.startswith("UPC_")]:
        monkeypatch.delenv(key)
    model = json.dumps(str(tiny_model_dir))
    path = tmp_path / "upc.toml"
    path.write_text(
        f"""
data_dir = {json.dumps(str(tmp_path / "data"))}
[generation]
max_new_tokens = 12
[chatbot]
model = {model}
device = "cpu"
[critic]
model = {model}
device = "cpu"
[user_sim]
model = {model}
device = "cpu"
[learner]
batch_size = 4
""",
        encoding="utf-8",
    )
    return path


def _publish_random_lora(config_file: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(
        r=4,
        lora_alpha=64,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,  # random B too: the adapter really changes the model
        task_type="CAUSAL_LM",
    )
    source = tmp_path / "lora-src"
    get_peft_model(base, lora).save_pretrained(source)
    settings = load_settings(config_file)
    db = Database.from_settings(settings)
    try:
        AdapterRegistry(settings.adapters_dir, db).publish(
            source, AdapterManifest(id=ADAPTER_ID, base_model_id=str(tiny_model_dir))
        )
    finally:
        db.dispose()


def test_upc_eval_end_to_end_base_vs_adapter(
    config_file: Path, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    _publish_random_lora(config_file, tiny_model_dir, tmp_path)
    out = tmp_path / "eval-out"
    code = main(
        [
            "--config",
            str(config_file),
            "eval",
            "--split",
            "test",
            "--users",
            "3",
            "--turns",
            "3",
            "--systems",
            f"base,{ADAPTER_ID}",
            "--critic",
            "both",
            "--seed",
            "5",
            "--out",
            str(out),
            "--user-max-new-tokens",
            "16",
        ]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, printed
    assert "eval turns" in captured.err  # the tqdm progress bar
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["systems"]] == ["base", ADAPTER_ID]
    assert len(report["personas"]) == 3
    assert report["critic_id"] == "llm-logit:" + str(tiny_model_dir)
    assert report["second_critic_id"].startswith("embedding:")
    assert report["perplexity_model_id"] == str(tiny_model_dir)
    for system in report["systems"]:
        assert system["dialogues"] == 3
        ok = system["dialogues"] - system["failed"]
        assert ok >= 2, system
        assert system["replies"] >= 2 * ok
        assert system["unscored"] == 0  # the logit critic always yields a score
        for key in ("rel", "int", "val", "mean"):
            ci = system["scores"][key]
            assert 1.0 <= ci["low"] <= ci["mean"] <= ci["high"] <= 5.0
            assert ci["n"] == system["replies"]
            second = system["secondary_scores"][key]
            assert 1.0 <= second["mean"] <= 5.0
        assert set(system["al"]["mean"]) == {"2", "3"}
        assert system["aloe"]["mean"]["ir"] is not None
        assert system["aloe"]["mean"]["turns"] == [2, 3]
        ppl = system["perplexity"]
        assert ppl["replies"] == system["replies"] and ppl["tokens"] > 0
        assert 1.0 < ppl["perplexity"] < 1e6
        assert -1.0 <= system["background_similarity"]["mean"] <= 1.0
        assert system["traits_total"] >= 3 * ok  # shipped users have occupation + education + hobby
        assert 0.0 <= system["discovery_rate"]["mean"] <= 1.0
        for rate in ("passivity_rate", "question_rate", "repetition_rate"):
            assert 0.0 <= system[rate]["mean"] <= 1.0
            assert system[rate]["n"] == system["replies"]
        assert system["agreement"]["pairs"] == system["replies"]
    assert report["agreement"]["pairs"] == sum(s["replies"] for s in report["systems"])

    lines = [json.loads(x) for x in (out / "dialogues.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    by_system: dict[str, list[str]] = {}
    for row in lines:
        turns = row["dialogue"]["turns"]
        assert len(row["second_scores"]) == len(turns)
        assert row["dialogue"]["adapter"] == (None if row["system"] == "base" else ADAPTER_ID)
        by_system.setdefault(row["system"], []).extend(t["final_reply"] for t in turns)
    # Same seeds and users: the random LoRA is what makes the replies differ.
    assert by_system["base"] != by_system[ADAPTER_ID]

    markdown = (out / "report.md").read_text()
    assert "| base |" in markdown and f"| {ADAPTER_ID} |" in markdown
    assert "Spearman" in markdown and "AL(k)" in markdown and "discovery" in markdown
    assert "| base |" in printed
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_upc_eval_refuses_unknown_adapter_and_bad_arguments(
    config_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "never"
    base = ["--config", str(config_file), "eval", "--users", "2", "--out", str(out)]
    assert main([*base, "--systems", "base,no-such-adapter", "--no-progress"]) == 2
    assert "no-such-adapter" in capsys.readouterr().err
    assert main([*base, "--turns", "11"]) == 2
    assert "turns must be 2 to 10" in capsys.readouterr().err
    assert main([*base, "--systems", "openai:gpt-4o"]) == 2
    assert "openai:MODEL@URL" in capsys.readouterr().err
    assert main([*base, "--personas", str(tmp_path / "missing.jsonl")]) == 2
    assert not out.exists()


def test_parse_systems_and_user_selection() -> None:
    specs = parse_systems("base, it-003 ,openai:qwen2.5-7b@http://localhost:8000/v1")
    assert specs == [
        SystemSpec("base", "base"),
        SystemSpec("it-003", "adapter", adapter="it-003"),
        SystemSpec(
            "openai:qwen2.5-7b", "openai", model="qwen2.5-7b", base_url="http://localhost:8000/v1"
        ),
    ]
    with pytest.raises(ValueError, match="twice"):
        parse_systems("base,base")
    with pytest.raises(ValueError):
        parse_systems(" , ")
    pool = list(range(100))
    picked = select_personas(pool, 10, seed=1)
    assert picked == select_personas(pool, 10, seed=1) and picked == sorted(picked)
    assert len(set(picked)) == 10 and picked != select_personas(pool, 10, seed=2)
    assert select_personas(pool[:3], 10, seed=1) == [0, 1, 2]
