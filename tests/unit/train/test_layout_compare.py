"""The per-tensor comparison of tests/distributed/test_layouts.py (`layout_helpers.compare`) on one process:
it accepts fp32 reduction-order noise (the same gradients summed over two half batches) and rejects one
small tensor's gradient scaled by 2 or 0.5 (a doubled or missing reduction), which the global gradient norm
the loss-curve rule compares hardly sees."""

from __future__ import annotations

import pytest
import torch
from layout_helpers import compare, merged

from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer
from mmkit.models.wan.tiny import TINY_DIT


def _grads(model: WanTransformer, halves: bool) -> dict[str, torch.Tensor]:
    """Gradients of the summed squared error on a fixed batch of 2, whole or as two micro-batches."""
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 6, 32, generator=g)
    t, target = torch.tensor([300.0, 700.0]), torch.randn(2, 16, 2, 4, 4, generator=g)
    model.zero_grad(set_to_none=True)
    for sl in (slice(0, 1), slice(1, 2)) if halves else (slice(0, 2),):
        (model(x[sl], t[sl], ctx[sl]) - target[sl]).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def grads():
    torch.manual_seed(0)
    model = WanTransformer(WanConfig(**dict(TINY_DIT, patch_size=tuple(TINY_DIT["patch_size"]))))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return _grads(model, halves=False), _grads(model, halves=True)


def _norm(gs: dict) -> float:
    return float(sum(g.double().pow(2).sum() for g in gs.values()) ** 0.5)


def test_reduction_order_noise_passes(grads):
    whole, halves = grads
    assert 0 < compare(whole, halves, 2e-3, "halves") < 2e-3  # not bit-equal, within tolerance


@pytest.mark.parametrize("name", ["blocks.0.norm_cross.weight", "blocks.1.attn.norm_q.weight"])
@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_one_scaled_gradient_fails(grads, name, factor):
    whole, halves = grads
    bad = {**halves, name: halves[name] * factor}
    assert abs(_norm(bad) / _norm(whole) - 1) < 1e-2  # the global norm barely moves
    with pytest.raises(AssertionError, match=name.replace(".", r"\.")):
        compare(whole, bad, 2e-3, "scaled")


def test_missing_tensor_and_diverging_replicas_fail(grads):
    whole, halves = grads
    with pytest.raises(AssertionError, match="missing"):
        compare(whole, {k: v for k, v in halves.items() if "norm_k" not in k}, 2e-3, "dropped")
    n = "head.proj.bias"  # two ranks holding one parameter must agree exactly
    ranks = [{"grads": {1: {n: whole[n]}}}, {"grads": {1: {n: whole[n] + 1e-7}}}]
    with pytest.raises(AssertionError, match="rank 1 holds a different copy"):
        merged(ranks, "grads", 1)
