"""Activation checkpointing changes memory, never results: same loss and gradients as without."""

import pytest
import torch
from wan_helpers import perturbed_reference

from mmkit.models.wan import hf
from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer
from mmkit.parallel.ac import apply_ac


def _model():
    ref = perturbed_reference(False, layers=4)
    m = WanTransformer(WanConfig.from_dict(dict(ref.config)))
    m.load_state_dict(hf.from_hf(ref.state_dict()))
    return m.train()


def _loss_and_grads(model):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, 2, 4, 6, generator=g), torch.randn(2, 7, 32, generator=g)
    loss = model(x, torch.tensor([100.0, 700.0]), ctx).pow(2).mean()
    loss.backward()
    return loss.item(), {
        k.replace("._checkpoint_wrapped_module", ""): p.grad for k, p in model.named_parameters()
    }


@pytest.mark.parametrize("mode, k, wrapped", [("full", 1, 4), ("selective", 2, 2), ("selective", 3, 2)])
def test_ac_matches_no_ac(mode, k, wrapped):
    base_loss, base_grads = _loss_and_grads(_model())
    model = _model()
    assert apply_ac(model, mode, k) == wrapped
    loss, grads = _loss_and_grads(model)
    assert loss == base_loss
    assert sorted(grads) == sorted(base_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], base_grads[name], atol=1e-6, rtol=1e-5)
    # state-dict keys are unchanged, so checkpoints and converters do not see the wrapping
    assert set(model.state_dict()) == set(_model().state_dict())


def test_ac_errors():
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        apply_ac(_model(), "some")
    with pytest.raises(ValueError, match="ac_every_k=0"):
        apply_ac(_model(), "selective", 0)
