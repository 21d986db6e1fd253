"""Real LoRA training on a tiny random-init Llama with the SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from core.embeddings import Embedder
from core.settings import load_settings
from learner.dpo_loop import DpoPair, balance_lengths, reply_logps, run_dpo
from learner.pair_filters import drifting_pairs
from learner.sft_data import load_pairs, without_turn_end
from learner.sft_loop import _collate, _collate_packed, _loss_sum, pack_rows
from learner.train import (
    IGNORE_INDEX,
    TrainConfig,
    TrainingDataError,
    TrainingStatusStore,
    build_example,
    dpo_pairs,
    plan_steps,
    train_adapter,
)
from storage.db import Database

SYSTEM = "You are a test chatbot."
DIALOGUES = [
    {
        "dialogue_id": "d1",
        "persona_id": "p1",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "assistant", "content": "Hello there, nice to meet you."},
            {"role": "user", "content": "I am Ana, a welder from Porto."},
            {"role": "assistant", "content": "Welding ships in Porto must be loud work!"},
            {"role": "user", "content": "It is, but I love the sea."},
            {"role": "assistant", "content": "Do you sail on weekends?"},
        ],
    },
    {
        "dialogue_id": "d2",
        "persona_id": "p2",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "assistant", "content": "Good morning!"},
            {"role": "user", "content": "Hi, I teach maths."},
            {"role": "assistant", "content": "Which topic do your pupils find hardest?"},
        ],
    },
]


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_dir))


@pytest.fixture
def sft_file(tmp_path) -> Path:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DIALOGUES), encoding="utf-8")
    return path


def _fast(**overrides) -> TrainConfig:
    values = {"lora_rank": 8, "learning_rate": 5e-3, "max_steps": 3, "device": "cpu"}
    values.update(overrides)
    return TrainConfig(**values)


def _labelled_runs(example) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_label_mask_covers_only_assistant_replies(tokenizer):
    messages = DIALOGUES[0]["messages"]
    example = build_example(tokenizer, "d1", messages, max_len=4096)
    assert example is not None
    decoded = [tokenizer.decode(run) for run in _labelled_runs(example)]
    expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert decoded == expected
    # Nothing of the system prompt, the user turns or the role headers is a target.
    masked_text = tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == -100]
    )
    assert "I am Ana" in masked_text and SYSTEM in masked_text
    assert masked_text.count("<|im_start|>assistant") == 3


def test_logged_rows_train_on_their_last_reply_only(tokenizer):
    messages = DIALOGUES[0]["messages"]
    example = build_example(tokenizer, "d1", messages, max_len=4096, last_only=True)
    decoded = [tokenizer.decode(run) for run in _labelled_runs(example)]
    last = [m["content"] for m in messages if m["role"] == "assistant"][-1]
    assert decoded == [last + "<|im_end|>"]


def test_label_mask_truncation_and_empty(tokenizer):
    messages = DIALOGUES[0]["messages"]
    full = build_example(tokenizer, "d1", messages, max_len=4096)
    cut = build_example(tokenizer, "d1", messages, max_len=len(full.input_ids) - 5)
    assert cut is not None and len(cut.input_ids) == len(full.input_ids) - 5
    # A window that ends before the first reply has nothing to learn.
    assert build_example(tokenizer, "d1", messages, max_len=8) is None


def test_a_per_turn_example_keeps_its_reply_when_cut(tokenizer):
    messages = DIALOGUES[0]["messages"]
    full = build_example(tokenizer, "d1", messages, max_len=4096, last_only=True)
    cut = build_example(tokenizer, "d1", messages, max_len=12, last_only=True)
    # The oldest context goes; the target reply at the end stays whole.
    assert cut is not None and len(cut.input_ids) == 12
    assert cut.input_ids == full.input_ids[-12:] and cut.labels == full.labels[-12:]
    assert cut.label_tokens == full.label_tokens


def test_plan_steps_scales_warmup_for_small_data():
    config = TrainConfig()
    assert plan_steps(40, config) == (20, 2)
    assert plan_steps(3, config) == (2, 0)
    assert plan_steps(100_000, config) == (50_000, 100)
    assert plan_steps(10, TrainConfig(max_steps=7)) == (7, 0)


def test_training_changes_lora_not_base(tiny_model_dir, sft_file, tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'upc.db'}", data_dir=tmp_path)
    store = TrainingStatusStore(db)
    out = tmp_path / "adapter"
    result = train_adapter(
        tiny_model_dir,
        sft_file,
        out,
        _fast(),
        system_prompt=SYSTEM,
        status=store,
        run_id="run-1",
        iteration=1,
        keep_model=True,
    )
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    # LoRA B starts at zero: a non-zero B proves the adapter learned.
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    base_on_disk = load_file(str(tiny_model_dir / "model.safetensors"))
    trained_base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in result.model.state_dict().items()
        if "lora_" not in k
    }
    compared = 0
    for name, tensor in base_on_disk.items():
        assert torch.equal(trained_base[name].cpu(), tensor), name
        compared += 1
    assert compared == len(base_on_disk)
    assert result.steps == 3 and result.examples == 2 and result.tokens_per_s > 0
    history = json.loads((out / "loss.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    assert (out / "loss.png").stat().st_size > 1000
    status = store.get("run-1")
    assert status.status == "done" and status.progress == 1.0 and status.step == 3
    assert status.loss == pytest.approx(history[-1]["loss"])


def test_reloaded_adapter_changes_logits(tiny_model_dir, sft_file, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    # Packed rows (both dialogues in one row) train through the same loop.
    result = train_adapter(
        tiny_model_dir, sft_file, out, _fast(pack_tokens=512, batch_size=2), system_prompt=SYSTEM
    )
    assert result.steps == 3 and result.tokens > 0
    ids = torch.tensor([[1, 504, 3205, 2]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    served = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        adapted = served(ids).logits
        with served.disable_adapter():
            again = served(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    assert torch.allclose(again, base_logits, atol=1e-6)


def test_next_iteration_continues_from_parent(tiny_model_dir, sft_file, tmp_path):
    parent = tmp_path / "it1"
    train_adapter(tiny_model_dir, sft_file, parent, _fast(), system_prompt=SYSTEM)
    child = tmp_path / "it2"
    # A vanishing learning rate: the child must start from (and stay at) the parent's weights.
    train_adapter(
        tiny_model_dir,
        sft_file,
        child,
        _fast(learning_rate=1e-12, max_steps=1),
        system_prompt=SYSTEM,
        parent_adapter_dir=parent,
    )
    p = load_file(str(parent / "adapter_model.safetensors"))
    c = load_file(str(child / "adapter_model.safetensors"))
    assert p.keys() == c.keys()
    lora_b = [k for k in p if "lora_B" in k]
    assert lora_b and all(p[k].abs().sum() > 0 for k in lora_b)
    for key in p:
        assert torch.allclose(p[key], c[key], atol=1e-6), key


def _pairs_file(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    prompt = DIALOGUES[0]["messages"][:3]
    rows = [
        {
            "pair_id": f"x{i}",
            "dialogue_id": "d1",
            "prompt": prompt,
            "chosen": "Porto's shipyards have a long history. Which ships do you weld?",
            "rejected": "How can I help you?",
        }
        for i in range(2)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return pairs


def test_dpo_stage_after_sft(tiny_model_dir, sft_file, tmp_path):
    pairs = _pairs_file(tmp_path)
    out = tmp_path / "adapter"
    result = train_adapter(
        tiny_model_dir,
        sft_file,
        out,
        _fast(dpo=True, max_steps=2, dpo_learning_rate=1e-3),
        system_prompt=SYSTEM,
        pairs_path=pairs,
    )
    assert result.dpo is not None and result.dpo["pairs"] == 2 and result.dpo["steps"] == 1
    # One step already moves the policy towards the chosen reply, against the SFT reference.
    assert result.dpo["mean_margin"] > 0 and result.dpo["pair_accuracy"] == 1.0
    stages = {h["stage"] for h in json.loads((out / "loss.json").read_text())}
    assert stages == {"sft", "dpo"}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and not any(".ref." in k for k in weights)


def test_dpo_alone_from_the_base(tiny_model_dir, sft_file, tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(TrainingDataError, match="no preference pairs"):
        train_adapter(
            tiny_model_dir, sft_file, out, _fast(epochs=0, max_steps=-1), system_prompt=SYSTEM
        )
    result = train_adapter(
        tiny_model_dir,
        sft_file,
        out,
        _fast(dpo=True, epochs=0, max_steps=-1, dpo_learning_rate=1e-3),
        system_prompt=SYSTEM,
        pairs_path=_pairs_file(tmp_path),
    )
    # No SFT step ran: the reference is the base itself, and DPO moved the policy off it.
    stages = {h["stage"] for h in json.loads((out / "loss.json").read_text())}
    assert stages == {"dpo"} and result.tokens_trained == 0 and result.steps == 0
    assert result.dpo is not None and result.dpo["mean_margin"] > 0
    assert result.heldout_loss == result.heldout_loss_before


def test_a_capped_rejected_reply_keeps_no_end_of_turn_label(tokenizer):
    messages = [*DIALOGUES[0]["messages"][:3], {"role": "assistant", "content": "Ships are"}]
    full = build_example(tokenizer, "d1", messages, 256, last_only=True)
    cut = without_turn_end(full)
    labelled = [i for i, x in enumerate(full.labels) if x != IGNORE_INDEX]
    assert cut.label_tokens == full.label_tokens - 1
    # The unlabelled token is the end-of-turn the model never generated; the words stay.
    assert cut.labels[labelled[-1]] == IGNORE_INDEX
    assert tokenizer.decode([full.input_ids[labelled[-1]]]).strip() == "<|im_end|>"
    assert cut.input_ids == full.input_ids


def test_dpo_length_term_credits_length_not_the_policy(tiny_model_dir, tokenizer):
    prompt = DIALOGUES[0]["messages"][:3]

    def pair() -> DpoPair:
        long = "Porto's shipyards have a long history, and welding keeps them going. Which?"
        made = [
            build_example(tokenizer, "d1", [*prompt, {"role": "assistant", "content": text}], 256)
            for text in (long, "Nice.")
        ]
        return DpoPair(made[0], made[1])

    first_losses, margins = [], []
    for alpha in (0.0, 0.05):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(True)
        result = run_dpo(
            model, [pair()], pad_id=tokenizer.pad_token_id, device="cpu", beta=0.1,
            learning_rate=1e-3, total_steps=3, warmup_steps=0, schedule="constant",
            batch_size=1, max_grad_norm=1.0, seed=0, length_alpha=alpha,
        )  # fmt: skip
        first_losses.append(result.loss_history[0]["loss"])
        margins.append(result.mean_margin)
    gap = pair().length_gap
    assert gap > 10
    # Policy = reference at the first step: plain DPO's loss is log 2. R-DPO credits the
    # longer chosen reply's length (+alpha x gap inside the sigmoid), so its loss is lower...
    assert first_losses[0] == pytest.approx(0.6931, abs=1e-3)
    expected = float(-torch.nn.functional.logsigmoid(torch.tensor(0.05 * gap)))
    assert first_losses[1] == pytest.approx(expected, abs=1e-3)
    assert first_losses[1] < first_losses[0]
    # ...and the policy is pushed less towards the longer reply.
    assert 0 < margins[1] < margins[0]


def test_dpo_chosen_nll_keeps_the_chosen_reply_likely(tiny_model_dir, tokenizer):
    prompt = DIALOGUES[0]["messages"][:3]
    chosen_text = "Welding in Porto sounds demanding. Do you work on ships?"
    chosen, rejected = (
        build_example(tokenizer, "d1", [*prompt, {"role": "assistant", "content": text}], 256)
        for text in (chosen_text, "How can I help you today?")
    )
    first_losses, chosen_logps = [], []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(True)
        pair = DpoPair(chosen, rejected)
        result = run_dpo(
            model, [pair], pad_id=tokenizer.pad_token_id, device="cpu", beta=0.1,
            learning_rate=1e-3, total_steps=3, warmup_steps=0, schedule="constant",
            batch_size=1, max_grad_norm=1.0, seed=0, chosen_nll=weight,
        )  # fmt: skip
        first_losses.append(result.loss_history[0]["loss"])
        batch = _collate([chosen], tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            chosen_logps.append((pair.ref_chosen, float(reply_logps(model, batch)[0])))
    # At the first step policy = reference: DPO's loss is log 2, plus the chosen reply's
    # mean token NLL under the model when the term is on.
    ref_logp = chosen_logps[0][0]
    assert first_losses[0] == pytest.approx(0.6931, abs=1e-3)
    expected = 0.6931 - ref_logp / chosen.label_tokens
    assert first_losses[1] == pytest.approx(expected, rel=1e-3)
    # With the term the chosen reply ends up more likely than with DPO alone.
    assert chosen_logps[1][1] > chosen_logps[0][1]
    assert TrainConfig().dpo_chosen_nll == 0.0
    settings = load_settings(env={"UPC_LEARNER__DPO_CHOSEN_NLL": "0.5"})
    assert TrainConfig.from_settings(settings.learner.train).dpo_chosen_nll == 0.5


def test_balanced_pairs_leave_no_length_signal(tokenizer):
    prompt = DIALOGUES[0]["messages"][:3]

    def made(text: str):
        return build_example(
            tokenizer, "d1", [*prompt, {"role": "assistant", "content": text}], 256
        )

    short, mid, long = (
        made("Nice."),
        made("Nice, which ships?"),
        made("Nice. Which ships do you weld in Porto, and for whom do you build them?"),
    )
    pairs = [
        DpoPair(long, short),  # chosen longer, largest gap
        DpoPair(mid, short),  # chosen longer
        DpoPair(long, mid),  # chosen longer
        DpoPair(short, mid),  # chosen shorter
        DpoPair(mid, mid),  # a tie stays
    ]
    kept = balance_lengths(pairs)
    gaps = [p.length_gap for p in kept]
    assert sum(g > 0 for g in gaps) == sum(g < 0 for g in gaps) == 1
    assert 0 in gaps and pairs[0] not in kept
    # The kept chosen-longer pair is the one with the smallest gap, and order is kept.
    assert kept == [pairs[1], pairs[3], pairs[4]]
    assert balance_lengths([]) == []


def test_dpo_with_balanced_lengths_reports_the_dropped_pairs(tiny_model_dir, sft_file, tmp_path):
    out = tmp_path / "adapter"
    config = _fast(dpo=True, max_steps=1, dpo_learning_rate=1e-3, dpo_balance_length=True)
    result = train_adapter(
        tiny_model_dir, sft_file, out, config, system_prompt=SYSTEM,
        pairs_path=_pairs_file(tmp_path),
    )  # fmt: skip
    # Both pairs prefer the longer reply and none the shorter: none is left to learn from.
    assert result.dpo == {
        "pairs": 0,
        "pairs_dropped_for_length": 2,
        "pairs_dropped_for_drift": 0,
        "steps": 0,
    }
    # DPO alone with no pair left refuses, rather than publish the base under a new id.
    with pytest.raises(TrainingDataError, match="none of the 2 preference pairs"):
        train_adapter(
            tiny_model_dir, sft_file, tmp_path / "alone",
            dataclasses.replace(config, epochs=0, max_steps=-1), system_prompt=SYSTEM,
            pairs_path=_pairs_file(tmp_path),
        )  # fmt: skip
    assert not (tmp_path / "alone" / "adapter_model.safetensors").exists()


def test_rejected_replies_keep_no_end_of_turn_label_by_default(tokenizer, tmp_path):
    rows = load_pairs(_pairs_file(tmp_path), system_prompt=SYSTEM)
    rows[1]["rejected_capped"] = True

    def reply_tokens(config: TrainConfig) -> list[tuple[int, int]]:
        pairs, built = dpo_pairs(tokenizer, rows, config)
        assert built == len(pairs) == 2
        return [(p.chosen.label_tokens, p.rejected.label_tokens) for p in pairs]

    default = reply_tokens(_fast())
    labelled = reply_tokens(_fast(dpo_rejected_turn_end=True))
    # The chosen side always learns its end-of-turn; the rejected side never unlearns one,
    # except on request, and a capped rejected reply (which never ended) not even then.
    assert [c for c, _ in default] == [c for c, _ in labelled]
    assert labelled[0][1] == default[0][1] + 1
    assert labelled[1][1] == default[1][1]


def test_bad_training_file_is_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"dialogue_id": "x", "messages": [{"role": "user"}]}\n', encoding="utf-8")
    with pytest.raises(TrainingDataError, match="malformed message"):
        train_adapter(tiny_model_dir, bad, tmp_path / "out", _fast(), system_prompt=SYSTEM)
    no_reply = tmp_path / "sft2.jsonl"
    no_reply.write_text(
        json.dumps({"dialogue_id": "y", "messages": [{"role": "user", "content": "hi"}]}) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(TrainingDataError, match="no dialogue"):
        train_adapter(tiny_model_dir, no_reply, tmp_path / "out", _fast(), system_prompt=SYSTEM)


def test_packed_rows_give_the_same_loss_as_padded_rows(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.eval()
    examples = [build_example(tokenizer, d["dialogue_id"], d["messages"], 256) for d in DIALOGUES]
    examples = examples * 3  # six examples, packed two or three to a row
    pad = tokenizer.pad_token_id
    lengths = [len(ex.input_ids) for ex in examples]
    rows = pack_rows(lengths, 2 * max(lengths))
    assert sorted(i for row in rows for i in row) == list(range(6)) and len(rows) < 6
    assert all(sum(lengths[i] for i in row) <= 2 * max(lengths) for row in rows)
    with torch.no_grad():
        padded, n_padded = _loss_sum(model, _collate(examples, pad, "cpu"))
        packed_batch = _collate_packed(examples, 2 * max(lengths), pad, "cpu")
        packed, n_packed = _loss_sum(model, packed_batch)
    assert packed_batch["input_ids"].shape[0] == len(rows)
    assert int(n_padded) == int(n_packed) > 0
    # Block-diagonal attention and restarted positions: no example sees another.
    assert float(packed) == pytest.approx(float(padded), rel=1e-4)


def test_pairs_that_drift_from_the_user_are_dropped_before_dpo(tiny_model_dir, sft_file, tmp_path):
    prompt = DIALOGUES[0]["messages"][:3]  # the user: "I am Ana, a welder from Porto."
    on_topic = "Welding in Porto sounds demanding. Do you work on ships or on bridges?"
    off_topic = "I baked sourdough bread this morning and the crust came out lovely."
    rows = [
        {"pair_id": "keep", "prompt": prompt, "chosen": on_topic, "rejected": "How can I help?"},
        {"pair_id": "drift", "prompt": prompt, "chosen": off_topic, "rejected": on_topic},
        {"pair_id": "keep-2", "prompt": prompt, "chosen": on_topic, "rejected": off_topic},
    ]
    encoder = Embedder()
    assert drifting_pairs(rows, encoder, 0.1) == [False, True, False]
    assert drifting_pairs(rows, encoder, 1.5) == [False, False, False]  # cosines span < 1.5
    # A greeting pair (no user message yet) is never called drifting.
    opening = {**rows[1], "prompt": prompt[:2]}
    assert drifting_pairs([opening], encoder, 0.0) == [False]
    with pytest.raises(ValueError, match="margin"):
        drifting_pairs(rows, encoder, -0.1)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = _fast(dpo=True, epochs=0, max_steps=-1, dpo_learning_rate=1e-3)
    result = train_adapter(
        tiny_model_dir, sft_file, tmp_path / "adapter",
        dataclasses.replace(config, dpo_relevance_margin=0.1), system_prompt=SYSTEM,
        pairs_path=pairs,
    )  # fmt: skip
    assert result.dpo is not None
    assert result.dpo["pairs"] == 2 and result.dpo["pairs_dropped_for_drift"] == 1
    # The metrics go into the adapter's JSON manifest (numpy numbers once broke publishing).
    assert json.loads(json.dumps(result.metrics()))["dpo"]["pairs_dropped_for_drift"] == 1
    assert all(type(flag) is bool for flag in drifting_pairs(rows, encoder, 0.1))
    # Off by default: every pair trains.
    assert TrainConfig().dpo_relevance_margin < 0
    settings = load_settings(env={"UPC_LEARNER__DPO_RELEVANCE_MARGIN": "0.1"})
    assert TrainConfig.from_settings(settings.learner.train).dpo_relevance_margin == 0.1
