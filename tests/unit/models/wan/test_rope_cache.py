"""RoPE tables are a per-process cache keyed by (grid, head_dim, device, dtype), not per-call state on a
shared module: requests of different sizes running at once in one process each get their own tables."""

import threading

import torch

from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer, cached_rope_tables, rope_tables
from mmkit.models.wan.tiny import TINY_DIT


def _model():
    torch.manual_seed(0)
    model = WanTransformer(WanConfig(**dict(TINY_DIT, patch_size=tuple(TINY_DIT["patch_size"])))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_tables_are_shared_per_key_and_equal_to_fresh_ones():
    model = _model()
    a = model.rope((2, 3, 4), torch.device("cpu"), torch.float32)
    assert model.rope([2, 3, 4], "cpu", torch.float32) is a  # one entry per key, however the key is spelled
    b = model.rope((1, 3, 4), torch.device("cpu"), torch.float32)
    assert b[0].shape == (12, 32) and a[0].shape == (24, 32)
    for got, want in zip(a, rope_tables((2, 3, 4), 32, torch.device("cpu"), torch.float32)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not hasattr(model, "_rope_cache")  # nothing per call is kept on the module


def test_tables_made_under_inference_mode_serve_training():
    cached_rope_tables.cache_clear()
    model = _model()
    x, ctx = torch.randn(1, 16, 1, 4, 6), torch.randn(1, 5, 32)
    with torch.inference_mode():
        model(x, torch.tensor([10.0]), ctx)
    model.train()
    model(x, torch.tensor([10.0]), ctx).square().sum().backward()  # same grid: the cached tables
    assert model.blocks[0].attn.q.weight.grad is not None


def test_two_requests_in_threads_match_running_alone():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    reqs = [
        (torch.randn(1, 16, 2, 4, 6, generator=gen), torch.randn(1, 5, 32, generator=gen)),
        (torch.randn(1, 16, 3, 6, 4, generator=gen), torch.randn(1, 5, 32, generator=gen)),
    ]
    with torch.no_grad():
        alone = [model(x, torch.tensor([500.0]), ctx) for x, ctx in reqs]
    cached_rope_tables.cache_clear()
    got, barrier = [None, None], threading.Barrier(2)

    def run(i):
        barrier.wait()
        with torch.no_grad():
            for _ in range(5):  # both grids interleave in the one cache
                got[i] = model(reqs[i][0], torch.tensor([500.0]), reqs[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, a in zip(got, alone):
        torch.testing.assert_close(g, a, rtol=0, atol=0)
