"""`model.compile`: blocks compiled in place give the eager loss and gradients, names unchanged."""

import torch

from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer
from mmkit.models.wan.tiny import TINY_DIT
from mmkit.parallel.ac import apply_ac
from mmkit.parallel.compile import apply_compile


def _loss_and_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 8, TINY_DIT["text_dim"], generator=g)
    out = model(x, torch.tensor([500.0]), ctx)
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_match_eager():
    torch.manual_seed(0)
    eager = WanTransformer(WanConfig(**TINY_DIT))
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.05 * torch.randn_like(p))
    compiled = WanTransformer(WanConfig(**TINY_DIT))
    compiled.load_state_dict(eager.state_dict())
    apply_ac(compiled, "full")
    assert apply_compile(compiled, "aot_eager") == TINY_DIT["num_layers"]
    assert apply_compile(eager, "none") == 0
    assert all(b._compiled_call_impl is not None for b in compiled.blocks)
    assert all(b._compiled_call_impl is None for b in eager.blocks)
    l0, g0 = _loss_and_grads(eager)
    l1, g1 = _loss_and_grads(compiled)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    names = {n.replace("._checkpoint_wrapped_module", "") for n in g1}
    assert names == set(g0)  # in-place compile: same parameter names (checkpoints unchanged)
    for n, g in g1.items():
        torch.testing.assert_close(g, g0[n.replace("._checkpoint_wrapped_module", "")], rtol=1e-4, atol=1e-6)
