"""The VLM inference engine on a tiny random Qwen2.5-VL: cache vs recompute, EOS, padding, sampling."""

from __future__ import annotations

import pytest
import torch
from qwen2_5_vl_helpers import left_pad, pixels, prompt

from mmkit.infer.vlm import KVCache, SamplingParams, generate, sample
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tiny import perturbed_init, tiny_config


@pytest.fixture(scope="module")
def model():
    m = Qwen2_5_VLModel(tiny_config())
    perturbed_init(m, seed=1)
    return m.eval()


def _image_prompt(model, seed, grid=(1, 8, 12), before=4, after=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt(model.cfg, g, [before, ("image", grid), after])])
    return {"input_ids": ids, "pixel_values": pixels([grid], g), "image_grid_thw": torch.tensor([grid])}


def test_kv_cache_decode_equals_full_recompute(model):
    inputs = _image_prompt(model, 0)
    out = generate(model, inputs, SamplingParams(max_new_tokens=12))
    ids = inputs["input_ids"]
    naive = []
    with torch.no_grad():
        for _ in range(12):  # recompute the whole sequence (vision included) for every token
            logits = model(ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
            tok = int(logits[0, -1].argmax())
            naive.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    assert out.tokens[0] == naive
    assert len(set(naive)) > 1  # not a constant stream that any bug would reproduce


def test_stops_on_eos(model):
    inputs = _image_prompt(model, 1)
    free = generate(model, inputs, SamplingParams(max_new_tokens=10)).tokens[0]
    eos = free[3]
    first = free.index(eos)
    stopped = generate(model, inputs, SamplingParams(max_new_tokens=10, eos_token_ids=(eos,))).tokens[0]
    assert stopped == free[: first + 1]


def test_left_padded_batch_equals_unbatched(model):
    a = _image_prompt(model, 2, grid=(1, 8, 12), before=7, after=9)
    b = _image_prompt(model, 3, grid=(1, 8, 8), before=2, after=1)
    ids, mask = left_pad(
        [a["input_ids"][0].tolist(), b["input_ids"][0].tolist()], pad_id=model.cfg.pad_token_id
    )
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
        "image_grid_thw": torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
    }
    params = SamplingParams(max_new_tokens=10)
    together = generate(model, batch, params)
    assert together.tokens == [generate(model, x, params).tokens[0] for x in (a, b)]
    assert together.prompt_tokens == [a["input_ids"].shape[1], b["input_ids"].shape[1]]


def test_right_padding_is_refused(model):
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, {"input_ids": ids.flip(1), "attention_mask": mask.flip(1)}, SamplingParams(4))


def test_seeded_sampling_repeats_and_tiny_top_p_is_greedy(model):
    inputs = _image_prompt(model, 4)
    hot = SamplingParams(max_new_tokens=8, temperature=1.5, seed=7)
    assert generate(model, inputs, hot).tokens == generate(model, inputs, hot).tokens
    greedy = generate(model, inputs, SamplingParams(max_new_tokens=8)).tokens
    nucleus = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=3)
    assert generate(model, inputs, nucleus).tokens == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 0.75, gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3


def test_streaming_callback_sees_every_token_in_order(model):
    inputs = _image_prompt(model, 5)
    seen = []
    out = generate(
        model, inputs, SamplingParams(max_new_tokens=6), on_token=lambda row, t: seen.append((row, t))
    )
    assert seen == [(0, t) for t in out.tokens[0]]


def test_kv_cache_overflow_is_an_error():
    cache = KVCache(1, 1, 1, 4, 2, torch.float32)
    cache.advance(3)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_onednn_path_keeps_logits_and_tokens(monkeypatch):
    from mmkit.models.common import ops

    m = Qwen2_5_VLModel(tiny_config())
    perturbed_init(m, seed=2)
    inputs = _image_prompt(m.eval(), 6)
    args = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    monkeypatch.setattr(ops, "ONEDNN", False)
    with torch.no_grad():
        before = m(inputs["input_ids"], **args)
    tokens = generate(m, inputs, SamplingParams(max_new_tokens=8)).tokens
    monkeypatch.setattr(ops, "ONEDNN", True)
    with torch.no_grad():
        after = m(inputs["input_ids"], **args)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert generate(m, inputs, SamplingParams(max_new_tokens=8)).tokens == tokens


def test_screened_greedy_equals_full_argmax():
    from mmkit.infer.accel.greedy import ScreenedArgmax

    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 64, generator=g) * 0.05
    head = ScreenedArgmax(w)
    for scale in (0.01, 1.0, 30.0):  # from near-ties everywhere to a clear winner
        h = torch.randn(16, 64, generator=g) * scale
        assert torch.equal(head(h), (h @ w.T).argmax(-1))
        assert 16 <= head.last_candidates < 16 * 5000  # screened, not all
    # forced near-tie: two rows that differ below bf16 resolution; the exact fp32 winner must be chosen
    w2 = w.clone()
    w2[7] = w2[3] * (1 + 1e-4)
    h = w2[3:4] * 10
    assert head.__class__(w2)(h).item() == int((h @ w2.T).argmax())


def test_screened_and_plain_greedy_generate_the_same_tokens():
    m = Qwen2_5_VLModel(tiny_config())
    perturbed_init(m, seed=5)
    inputs = _image_prompt(m.eval(), 6)
    a = generate(m, inputs, SamplingParams(max_new_tokens=12), screen_greedy=True).tokens
    b = generate(m, inputs, SamplingParams(max_new_tokens=12), screen_greedy=False).tokens
    assert a == b and len(a[0]) == 12
