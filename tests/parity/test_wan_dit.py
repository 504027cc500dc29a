"""mmkit WanTransformer == diffusers WanTransformer3DModel on tiny random perturbed configs."""

import pytest
import torch
from wan_helpers import perturbed_reference

from mmkit.models.wan import hf
from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer


def _pair(i2v):
    ref = perturbed_reference(i2v)
    model = WanTransformer(WanConfig.from_dict(dict(ref.config))).eval()
    model.load_state_dict(hf.from_hf(ref.state_dict()))
    return ref, model


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_dit_matches_diffusers_fp32(i2v):
    ref, model = _pair(i2v)
    g = torch.Generator().manual_seed(1)
    cin = 36 if i2v else 16
    x = torch.randn(2, cin, 3, 6, 10, generator=g)  # odd token grid 3x3x5
    t = torch.tensor([913.0, 41.5])
    # diffusers splits i2v context as [image | last 512 text tokens], so i2v text is 512 long
    ctx = torch.randn(2, 512 if i2v else 9, 32, generator=g)
    img = torch.randn(2, 5, 40, generator=g) if i2v else None
    with torch.no_grad():
        kw = {"encoder_hidden_states_image": img} if i2v else {}
        want = ref(x, t, ctx, return_dict=False, **kw)[0]
        got = model(x, t, ctx, img)
    assert got.shape == x[:, :16].shape
    assert want.abs().max() > 0.5  # a non-trivial output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dit_bf16_close_to_fp32():
    ref, model = _pair(False)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 6, 32, generator=g)
    with torch.no_grad():
        want = model(x, 500.0, ctx)
        model.to_dtype(torch.bfloat16)
        assert model.time_proj.weight.dtype == torch.float32  # kept in fp32 like diffusers
        assert model.blocks[0].attn.q.weight.dtype == torch.bfloat16
        got = model(x, 500.0, ctx)
    # measured 1.06% of the output's range (seeded inputs and weights: stable); ~2x that
    assert (got.float() - want).abs().max() < 0.022 * want.abs().max()


def test_text_context_list_is_zero_padded_to_text_len():
    ref, model = _pair(False)
    model.cfg.text_len = 12
    x = torch.randn(2, 16, 1, 4, 4)
    a, b = torch.randn(5, 32), torch.randn(12, 32)
    padded = torch.stack([torch.cat([a, torch.zeros(7, 32)]), b])
    with torch.no_grad():
        torch.testing.assert_close(model(x, 10.0, [a, b]), model(x, 10.0, padded))


def test_bad_shapes_raise_before_compute():
    _, model = _pair(False)
    with pytest.raises(ValueError, match="expected \\(B, 16, T, H, W\\)"):
        model(torch.randn(1, 15, 1, 4, 4), 1.0, torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="H=5 is not a multiple"):
        model(torch.randn(1, 16, 1, 5, 4), 1.0, torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="takes no CLIP image context"):
        model(torch.randn(1, 16, 1, 4, 4), 1.0, torch.randn(1, 3, 32), torch.randn(1, 5, 40))


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_dit_gradients_match_diffusers(i2v):
    ref, model = _pair(i2v)
    ref.train(), model.train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 36 if i2v else 16, 2, 4, 6, generator=g)
    ctx = torch.randn(2, 512 if i2v else 7, 32, generator=g)
    img = torch.randn(2, 5, 40, generator=g) if i2v else None
    target = torch.randn(2, 16, 2, 4, 6, generator=g)
    t = torch.tensor([250.0, 875.0])
    kw = {"encoder_hidden_states_image": img} if i2v else {}
    (ref(x, t, ctx, return_dict=False, **kw)[0] - target).pow(2).mean().backward()
    (model(x, t, ctx, img) - target).pow(2).mean().backward()
    want = hf.from_hf({k: p.grad for k, p in ref.named_parameters()})
    got = {k: p.grad for k, p in model.named_parameters()}
    assert sorted(want) == sorted(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4, msg=k)


def test_chunked_mlp_inference_equals_unchunked(monkeypatch):
    from mmkit.models.wan.model import WanMLP

    ref, model = _pair(False)
    x, ctx = torch.randn(1, 16, 3, 6, 10), torch.randn(1, 7, 32)  # 45 tokens
    with torch.no_grad():
        whole = model(x, 100.0, ctx)
        monkeypatch.setattr(WanMLP, "chunk", 8)  # 45 tokens -> 6 chunks of 7-8 rows
        chunked = model(x, 100.0, ctx)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
