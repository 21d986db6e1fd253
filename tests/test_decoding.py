"""The batched decode loop: sampling on the device, batch-invariant seeds, compaction."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from core.attention import GROUPED_SDPA, use_grouped_attention
from core.decoding import DecodeRow, decode_rows, sample_tokens, uniform_noise
from core.local_model import LocalModel
from core.types import ChatMessage


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = LocalModel(tiny_model_dir, model_id="tiny", dtype="float32", max_batch_size=64)
    yield model
    model.close()


def _prompt(tiny, text):
    return tiny.encode([ChatMessage("system", "Be brief."), ChatMessage("user", text)])


def _decode(tiny, rows):
    def run(model, tokenizer):
        with torch.inference_mode():
            return decode_rows(
                model,
                rows,
                pad_id=tokenizer.pad_token_id,
                stop_ids=sorted(tiny._stop_ids),
                device="cpu",
                cache=DynamicCache(),
            )

    return tiny.run_exclusive(run)


def test_uniform_noise_is_uniform_and_depends_on_seed_step_and_token():
    seeds = torch.tensor([1, 2, 3, 2**40 + 5], dtype=torch.long)
    ids = torch.arange(4096).repeat(4, 1)
    u = uniform_noise(seeds, 0, ids)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(u[0], uniform_noise(seeds, 1, ids)[0])
    # The same (seed, step, token) always gives the same draw, wherever the row sits.
    assert torch.equal(uniform_noise(seeds[[2, 0]], 0, ids[:2])[1], u[0])


def test_sampling_follows_temperature_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]] * 3)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    one = torch.ones(3)
    greedy = sample_tokens(logits, seen, one, torch.zeros(3), one, torch.arange(3), 0)
    assert greedy.tolist() == [1, 1, 1]
    # A tiny top-p keeps only the likeliest token, whatever the draw.
    narrow = sample_tokens(logits, seen, one, one, torch.full((3,), 1e-3), torch.arange(3), 0)
    assert narrow.tolist() == [1, 1, 1]
    # A heavy repetition penalty on token 1 moves the greedy choice to token 3.
    seen[:, 1] = True
    moved = sample_tokens(
        logits, seen, torch.full((3,), 2.0), torch.zeros(3), one, torch.arange(3), 0
    )
    assert moved.tolist() == [3, 3, 3]
    draws = {
        int(
            sample_tokens(
                logits[:1], seen[:1] & False, one[:1], one[:1], one[:1], torch.tensor([s]), 0
            )
        )
        for s in range(64)
    }
    assert {1, 3} <= draws  # temperature 1 samples both near-equal tokens


def test_rows_decode_the_same_alone_as_in_a_batch_that_compacts(tiny):
    texts = ["I bake bread.", "Tell me about boats and the sea, please.", "Hi"]
    rows = [
        DecodeRow(
            prompt=_prompt(tiny, texts[i % 3]),
            # Different caps make rows finish early, so the batch drops them midway.
            max_new_tokens=2 + (i % 6) * 3,
            min_new_tokens=1,
            temperature=1.0,
            top_p=0.95,
            repetition_penalty=1.2,
            seed=1000 + i,
        )
        for i in range(24)
    ]
    together = _decode(tiny, rows)
    assert len(together) == 24
    for i, row in enumerate(rows):
        alone = _decode(tiny, [row])[0]
        assert together[i].tokens == alone.tokens, i
        assert together[i].reason == alone.reason
        assert len(alone.tokens) <= row.max_new_tokens
    assert {r.reason for r in together} <= {"stop", "length"}
    # Same prompt, different seeds (best-of-n rows share one prefill) give different samples.
    same = [rows[0].prompt] * 3
    shared = _decode(
        tiny,
        [DecodeRow(p, 16, 1, 1.0, 1.0, 1.0, seed=s) for p, s in zip(same, (1, 2, 3), strict=True)],
    )
    assert len({tuple(r.tokens) for r in shared}) > 1
    assert (
        shared[1].tokens
        == _decode(tiny, [DecodeRow(same[0], 16, 1, 1.0, 1.0, 1.0, seed=2)])[0].tokens
    )


def test_grouped_attention_matches_the_stock_path(tiny_model_dir):
    """The tiny model has 4 query heads over 2 key/value heads: the grouped decode path must
    give the stock SDPA logits, padding included, step after step."""
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    grouped = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert use_grouped_attention(grouped)
    assert grouped.config._attn_implementation == GROUPED_SDPA
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [DynamicCache(), DynamicCache()]
    with torch.inference_mode():
        outs = [
            m(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=c)
            for m, c in zip((stock, grouped), caches, strict=True)
        ]
        for step in range(3):
            nxt = outs[0].logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], dim=1)
            pos = positions[:, -1:] + step + 1
            outs = [
                m(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=c)
                for m, c in zip((stock, grouped), caches, strict=True)
            ]
            assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5)
