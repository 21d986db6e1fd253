"""`upc eval` end to end on a tiny random model: 3 users, base vs a published LoRA adapter."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from chatbot.cli import main
from core.settings import load_settings
from learner.eval_cli import select_personas
from learner.eval_records import SystemSpec, parse_systems
from learner.eval_report import read_transcripts
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
            "2",
            "--seeds",
            "2",
            "--turns",
            "3",
            "--systems",
            f"base,{ADAPTER_ID}",
            "--train-critic",
            "llm",
            "--eval-critic",
            "spc",
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
    assert code == 0, printed + captured.err
    assert "eval turns" in captured.err  # the tqdm progress bar
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["systems"]] == ["base", ADAPTER_ID]
    assert len(report["personas"]) == 2 and report["config"]["seeds"] == 2
    assert report["base_system"] == "base"
    assert report["train_critic_id"] == "llm-logit:" + str(tiny_model_dir)
    assert report["eval_critic_id"].startswith("spc-ranker")
    assert report["perplexity_model_id"] == str(tiny_model_dir)
    for system in report["systems"]:
        assert system["dialogues"] == 4  # 2 users x 2 seeds
        ok = system["dialogues"] - system["failed"]
        assert ok >= 3, system
        assert system["replies"] >= 2 * ok
        for view in ("train", "eval"):
            figures = system[view]
            assert figures["replies"] == system["replies"]
            for key in ("rel", "int", "val", "mean"):
                ci = figures["scores"][key]
                assert 1.0 <= ci["low"] <= ci["mean"] <= ci["high"] <= 5.0
                assert ci["n"] == 2  # per-user means: the users are the unit
            assert set(figures["al"]["mean"]) == {"2", "3"}
            assert figures["aloe"]["mean"]["turns"] == [2, 3]
        assert system["train"]["unscored"] == 0  # the logit critic always yields a score
        checks = system["checks"]
        assert checks["replies"] == system["replies"]
        ppl = checks["perplexity"]
        assert ppl["replies"] == system["replies"] and ppl["tokens"] > 0
        assert 1.0 < ppl["perplexity"] < 1e6
        for rate in ("truncation_rate", "meta_rate", "placeholder_rate", "echo_rate"):
            assert 0.0 <= checks[rate] <= 1.0
        assert 0.0 < checks["distinct_2"] <= 1.0 and checks["traits_revealed"] >= 0.0
        assert checks["user_turns"] >= ok * 3
        assert -1.0 <= system["background_similarity"]["mean"] <= 1.0
        assert system["traits_total"] >= 3 * ok  # shipped users have occupation + education + hobby
        for rate in ("passivity_rate", "question_rate", "repetition_rate"):
            assert 0.0 <= system[rate]["mean"] <= 1.0
            assert system[rate]["n"] == system["replies"]
        assert system["agreement"]["pairs"] == system["replies"]
    base, cand = report["systems"]
    assert base["train"]["vs_base"] is None and base["regressions"] is None
    paired = cand["eval"]["vs_base"]["mean"]
    assert paired["n_users"] == 2 and paired["lo"] <= paired["mean_diff"] <= paired["hi"]
    expected = cand["eval"]["scores"]["mean"]["mean"] - base["eval"]["scores"]["mean"]["mean"]
    assert paired["mean_diff"] == pytest.approx(expected)
    assert isinstance(cand["regressions"], list)
    assert report["agreement"]["pairs"] == sum(s["replies"] for s in report["systems"])

    lines = [json.loads(x) for x in (out / "transcripts.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    by_system: dict[str, list[str]] = {}
    seeds: dict[tuple[str, str], list[int]] = {}
    for row in lines:
        turns = row["dialogue"]["turns"]
        assert len(row["eval_scores"]) == len(turns)
        assert row["eval_critic_id"] == report["eval_critic_id"] and row["background"]
        assert row["dialogue"]["adapter"] == (None if row["system"] == "base" else ADAPTER_ID)
        by_system.setdefault(row["system"], []).extend(t["final_reply"] for t in turns)
        seeds.setdefault((row["system"], row["persona_id"]), []).append(row["seed"])
    assert all(sorted(v) == [0, 1] for v in seeds.values()) and len(seeds) == 4
    # Same seeds and users: the random LoRA is what makes the replies differ.
    assert by_system["base"] != by_system[ADAPTER_ID]

    markdown = (out / "report.md").read_text()
    assert "| base |" in markdown and f"| {ADAPTER_ID} |" in markdown
    assert "Spearman" in markdown and "AL(k)" in markdown and "discovery" in markdown
    assert "Evaluation critic" in markdown and "Critic-free checks" in markdown
    assert "Difference to `base`" in markdown
    assert "| base |" in printed
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    page = tmp_path / "sbs.html"
    assert main(["eval", "side-by-side", "--a", str(out), "--a-system", "base",
                 "--b-system", ADAPTER_ID, "--out", str(page), "--n", "0"]) == 0  # fmt: skip
    key = json.loads((tmp_path / "sbs.key.json").read_text())
    assert len(key["items"]) == 4


def test_upc_eval_on_the_published_test_file(config_file: Path, tmp_path: Path, capsys) -> None:
    rows = []
    for copy in range(2):
        for i in range(200):
            rows.append(
                {
                    "stage": "test",
                    "id": 600 + i,
                    "name": f"Tester {i}",
                    "prompt": f"Tester {i} drives a night bus in Lyon, studied history, is calm "
                    f"but secretive, and restores old radios at home; file {i}.",
                    "expand_id": copy * 200 + i + 1,
                }
            )
    path = tmp_path / "isco800_test.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "published"
    argv = ["--config", str(config_file), "eval", "--personas", str(path), "--users", "2",
            "--seeds", "1", "--turns", "2", "--train-critic", "embedding", "--eval-critic",
            "rubric", "--no-perplexity", "--no-progress", "--out", str(out),
            "--user-max-new-tokens", "12"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "merged 200 duplicate rows" in err and "200 users" in err
    report = json.loads((out / "report.json").read_text())
    assert len(report["personas"]) == 2 and all(p.startswith("eval:") for p in report["personas"])
    assert report["systems"][0]["checks"]["perplexity"] is None
    assert report["train_critic_id"].startswith("embedding:")


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


def _eval_transcripts(config_file: Path, out: Path, *extra: str) -> list[tuple[str, list]]:
    args = ["--config", str(config_file), "eval", "--split", "test", "--users", "2"]
    args += ["--seeds", "2", "--turns", "2", "--systems", f"base,{ADAPTER_ID}", "--seed", "3"]
    args += ["--train-critic", "llm", "--eval-critic", "spc", "--no-perplexity"]
    args += ["--no-progress", "--user-max-new-tokens", "8", "--out", str(out), *extra]
    assert main(args) == 0
    rows = read_transcripts(out)
    return [
        (r.system, [(t["final_reply"], t["user_message"]) for t in r.dialogue["turns"]])
        for r in rows
    ]


def _peaked_model(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny model with its final norm scaled up, so its next-token distributions are as
    sharp as a trained model's. A random model's are nearly uniform over 49k tokens: every
    draw then sits next to a boundary of the sampling CDF, and the last-bit differences
    between two batch layouts (fp32 sums in another order) can flip it."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    model.save_pretrained(out)
    return out


def test_systems_generated_at_once_give_the_same_dialogues_as_one_after_another(
    config_file: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The default runs base and the adapter concurrently (their decode steps share
    batches, one adapter per row); per-row seeds make it the same evaluation, up to the
    float rounding of another batch layout (the test runs in fp64 to rule that out)."""
    peaked = _peaked_model(tiny_model_dir, tmp_path / "tiny-peaked")
    text = config_file.read_text(encoding="utf-8")
    text = text.replace(json.dumps(str(tiny_model_dir)), json.dumps(str(peaked)))
    # In fp32 two batch layouts sum in another order, and a draw next to a sampling
    # boundary can flip (seen once in a few hundred runs); fp64 leaves only the claim.
    config_file.write_text(text.replace('device = "cpu"', 'device = "cpu"\ndtype = "float64"'))
    _publish_random_lora(config_file, peaked, tmp_path)
    together = _eval_transcripts(config_file, tmp_path / "together")
    apart = _eval_transcripts(config_file, tmp_path / "apart", "--sequential")
    assert len(together) == 8 and together == apart
    assert all(turns for _, turns in together)  # real dialogues, not failed ones
    by_system = {s: [d for name, d in together if name == s] for s in ("base", ADAPTER_ID)}
    assert by_system["base"] != by_system[ADAPTER_ID]  # the adapter really ran on its rows
