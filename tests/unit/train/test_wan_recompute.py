"""Wan blocks with `recompute_hidden` (what selective activation checkpointing turns on): the same
forward and gradients as plain autograd, in fp32 and under bf16 autocast, while keeping far fewer bytes
for backward."""

import copy
import warnings

import pytest
import torch
from memory_helpers import saved_bytes
from wan_helpers import tiny_dit_kwargs

from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanBlock, WanMLP, WanTransformer
from mmkit.parallel.ac import apply_ac


def _model(i2v: bool, cross_attn_norm: bool = True) -> WanTransformer:
    """Tiny 2-block DiT, every parameter moved away from its init (zero-init layers would hide bugs)."""
    torch.manual_seed(0)
    m = WanTransformer(WanConfig.from_dict({**tiny_dit_kwargs(i2v, 2), "cross_attn_norm": cross_attn_norm}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.train()


def _run(model, i2v: bool, amp: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 36 if i2v else 16, 2, 4, 6, generator=g)  # 2 samples x 12 tokens
    ctx = torch.randn(2, 512 if i2v else 7, 32, generator=g)
    img = torch.randn(2, 5, 40, generator=g) if i2v else None
    with torch.autocast("cpu", torch.bfloat16, enabled=amp), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_norm's "mismatch dtype" notice under autocast
        out = model(x, torch.tensor([100.0, 700.0]), ctx, img)
    out.float().pow(2).mean().backward()
    return out.detach().float(), {k: p.grad for k, p in model.named_parameters()}


def _pair(i2v: bool, **kw):
    plain = _model(i2v, **kw)
    lean = copy.deepcopy(plain)
    for block in lean.blocks:
        block.recompute_hidden = True
    return plain, lean


@pytest.mark.parametrize(
    "i2v, cross_attn_norm", [(False, True), (True, True), (False, False)], ids=["t2v", "i2v", "no-cross-norm"]
)
def test_recompute_hidden_equals_autograd(monkeypatch, i2v, cross_attn_norm):
    monkeypatch.setattr(WanMLP, "chunk", 5)  # 24 rows -> 5 chunks: chunked forward and backward
    plain, lean = _pair(i2v, cross_attn_norm=cross_attn_norm)
    out_p, grads_p = _run(plain, i2v, amp=False)
    out_l, grads_l = _run(lean, i2v, amp=False)
    torch.testing.assert_close(out_l, out_p, rtol=1e-5, atol=1e-6)
    assert sorted(grads_l) == sorted(grads_p)
    for name, g in grads_p.items():
        assert g is not None and grads_l[name] is not None, name
        assert g.abs().max() > 0, name  # every parameter gets a real gradient
        torch.testing.assert_close(grads_l[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_recompute_hidden_under_bf16_autocast(monkeypatch):
    """Under autocast both paths round to bf16; the lean one must be as close to fp32 as autograd's."""
    monkeypatch.setattr(WanMLP, "chunk", 5)
    plain, lean = _pair(False)
    exact = copy.deepcopy(plain)
    _, want = _run(exact, False, amp=False)
    out_p, grads_p = _run(plain, False, amp=True)
    out_l, grads_l = _run(lean, False, amp=True)
    torch.testing.assert_close(out_l, out_p, rtol=0, atol=0)  # same ops on the same rows
    for name, w in want.items():
        scale = w.abs().max()
        err_p = (grads_p[name].float() - w).abs().max() / scale
        err_l = (grads_l[name].float() - w).abs().max() / scale
        assert grads_l[name].dtype == torch.float32, name
        assert err_l < 2 * err_p + 0.01, (name, float(err_l), float(err_p))


def _saved_per_token(block: WanBlock, dim: int) -> float:
    """Bytes autograd keeps per video token for one block (difference of two lengths)."""
    e, ctx = torch.randn(1, 6, dim), torch.randn(1, 16, dim)
    kept = []
    for s in (64, 192):
        x = torch.randn(1, s, dim, requires_grad=True)
        rope = (torch.randn(s, 64), torch.randn(s, 64))
        run = lambda: block(x, e, ctx, None, rope)  # noqa: E731, B023 (called right here)
        kept.append(saved_bytes(run, ignore=[*block.parameters(), *rope, e, ctx]))
    return (kept[1] - kept[0]) / 128


def test_recompute_hidden_keeps_fewer_activations():
    cfg = WanConfig(num_attention_heads=2, attention_head_dim=64, ffn_dim=768, num_layers=1)
    torch.manual_seed(0)
    block = WanBlock(cfg)
    dim, heads = cfg.dim, cfg.num_attention_heads
    plain = _saved_per_token(block, dim)
    block.recompute_hidden = True
    lean = _saved_per_token(block, dim)
    # fp32 (tokens, dim) tensors kept: the block input, the inputs of the cross-attention and the MLP,
    # q and k before their RMSNorm (self, and q of cross), the attention kernel's q, k, v and output (self)
    # and q and output (cross), the two gated branch outputs: 14, plus the kernel's fp32 logsumexp
    # (one value per head and token, self and cross)
    lse = 2 * heads * 4
    assert lean == 14 * dim * 4 + lse
    # autograd also keeps the three norm outputs, the normalized q, k (self) and q (cross), the two
    # attention outputs' (tokens, dim) copies, the MLP's two (tokens, ffn) tensors and the norms'
    # per-token statistics (1/rms of 3 RMSNorms, mean and 1/std of 3 LayerNorms)
    assert plain == (22 * dim + 2 * cfg.ffn_dim + 9) * 4 + lse


def test_selective_ac_turns_recompute_on():
    model = _model(False)
    assert apply_ac(model, "selective", every_k=2) == 1
    assert all(b.recompute_hidden for b in model.modules() if isinstance(b, WanBlock))
    model = _model(False)
    apply_ac(model, "full")
    assert not any(b.recompute_hidden for b in model.modules() if isinstance(b, WanBlock))
