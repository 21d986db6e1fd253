"""Diversity bounds with the real MiniLM embedder, and the LLM generator with a real
(tiny, randomly initialised) model: its garbage must be rejected and counted."""

from __future__ import annotations

import json

import pytest

from core.embeddings import Embedder
from core.local_model import LocalModel
from personas.catalog import load_shipped
from personas.diversity import DUPLICATE_THRESHOLD, diversity_report
from personas.generator import GeneratorConfig, PersonaGenerator, parse_candidate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def tiny_model(embedded_model_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LocalModel(
        "tiny-random-llama",
        model=LlamaForCausalLM(config),
        tokenizer=tokenizer,
        device="cpu",
        dtype="float32",
    )
    yield model
    model.close()


def test_shipped_set_diversity_bounds(shipped, embedder):
    report = diversity_report(shipped, embedder)
    figures = report.to_dict()
    print(json.dumps({k: v for k, v in figures.items() if k != "groups"}))
    assert report.n == 800
    assert report.max <= DUPLICATE_THRESHOLD and report.pairs_above == 0
    assert report.mean < 0.45
    assert len(report.within) == 40 and all(g.n == 20 for g in report.within.values())
    assert report.within_max <= DUPLICATE_THRESHOLD
    # Same-group users are more alike than random pairs, but far from copies.
    assert report.mean < report.within_mean < 0.6


def test_near_duplicates_are_rejected_against_the_pool(shipped, embedder, tiny_model):
    pool = [p.background for p in shipped[:200]]
    generator = PersonaGenerator(tiny_model, embedder, pool=pool)
    assert generator.is_near_duplicate(shipped[3].background)
    # A light paraphrase of a pool member is still a near duplicate at the 0.6 threshold.
    edited = shipped[3].background.replace(shipped[3].name, "Someone Else")
    assert generator.is_near_duplicate(edited)
    # Backgrounds from other groups, outside the pool, are accepted.
    outside = [p for p in shipped[200:] if p.isco_code not in {q.isco_code for q in shipped[:200]}]
    accepted = sum(not generator.is_near_duplicate(p.background) for p in outside[:40])
    assert accepted >= 30


def test_tiny_random_model_output_is_rejected_with_counted_reasons(embedder, tiny_model):
    config = GeneratorConfig(max_attempts=2, max_new_tokens=24, batch_size=4)
    generator = PersonaGenerator(tiny_model, embedder, config=config, seed=3)
    report = generator.generate(3, groups=["21", "72"], set_name="trial")
    assert report.personas == []
    assert report.attempts == 6  # 3 users x 2 bounded attempts
    assert sum(report.rejected.values()) == 6
    assert set(report.rejected) <= {"no_json", "invalid_json", "model_error"}


def test_candidate_validation_rules():
    name = "Ana Costa"
    ok = {
        "background": (
            "Ana Costa is a welder in Porto who fixes ship hulls at a busy yard. She finished a "
            "vocational welding course after leaving school at seventeen, then spent years as a "
            "shop assistant. Ana is generous and funny but stubborn, and she holds grudges for "
            "months. She was fired once after arguing with a foreman. Weekends are for surfing "
            "and repairing old radios with her nephew, and she is saving for a small boat."
        ),
        "occupation": "welder",
        "education": "vocational welding course",
        "personality": ["generous", "funny"],
        "flaws": ["stubborn"],
        "hobbies": ["surfing", "repairing old radios"],
        "setback": "fired after arguing with a foreman",
    }
    candidate, reason = parse_candidate(json.dumps(ok), name)
    assert reason == "ok" and candidate.traits.setback and candidate.traits.hobbies[0] == "surfing"
    assert parse_candidate("no braces here", name) == (None, "no_json")
    assert parse_candidate("{not json}", name) == (None, "invalid_json")
    short = dict(ok, background="Ana Costa is a welder who surfs and is stubborn.")
    assert parse_candidate(json.dumps(short), name) == (None, "word_count")
    assert parse_candidate(json.dumps(ok), "Bea Lima") == (None, "missing_name")
    no_hobby = dict(ok, hobbies=["beekeeping"])
    assert parse_candidate(json.dumps(no_hobby), name) == (None, "missing_element:hobby")
    missing = {k: v for k, v in ok.items() if k != "education"}
    assert parse_candidate(json.dumps(missing), name) == (None, "missing_field:education")
