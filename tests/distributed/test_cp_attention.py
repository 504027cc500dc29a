"""Context-parallel attention (mmkit/parallel/sequence.py) equals full attention, forward and backward.

Multi-process cases run `_cp_attention_worker.py` under torchrun on gloo: Ulysses, ring, double
ring and hybrid layouts, each with padding, causal and packed-sample masks, MHA and GQA, both block
kernels, and exact bytes_sent. The single-process cases check the kernels and the errors.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkit.parallel.sequence import ContextParallel, _Block, block_backward, block_forward

WORKER = Path(__file__).with_name("_cp_attention_worker.py")
# the worker's masks and reference (pytest runs with --import-mode=importlib: load it by path)
_spec = importlib.util.spec_from_file_location("_cp_attention_worker", WORKER)
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)
MASKS, S_PAD, allowed, reference = _worker.MASKS, _worker.S_PAD, _worker.allowed, _worker.reference


def launch(nproc: int, port: int, layouts: list[str]) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(port), str(WORKER), *layouts,
    ]  # fmt: skip
    repo = str(WORKER.parents[2])  # the worker imports mmkit even without an editable install
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)  # a hang fails fast
    assert res.returncode == 0, res.stderr[-4000:]
    print(res.stdout)  # MAXERR / BYTES lines, visible with -s
    for name in layouts:  # every layout reported: none was skipped
        assert f"MAXERR {name} world={nproc}" in res.stdout, res.stdout
    return res.stdout


def test_two_processes_ulysses_and_ring():
    launch(2, 29641, ["ulysses", "ring"])


def test_four_processes_hybrid_ring_double_ring_ulysses():
    launch(4, 29642, ["hybrid", "ring", "ring_w2", "ring_w1", "ulysses"])


@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_single_process_matches_sdpa(kernel):
    """cp size 1 (no process group): the whole sequence is one block; both kernels, all masks, GQA."""
    cp = ContextParallel(None, None, kernel=kernel)
    assert (cp.size, cp.rank) == (1, 0)
    for seed, (valid, causal, lengths, keys) in enumerate(MASKS.values()):
        for hq, hkv in ((4, 4), (4, 2), (4, 1)):
            torch.manual_seed(seed)
            q, k, v = (torch.randn(2, h, S_PAD, 8, requires_grad=True) for h in (hq, hkv, hkv))
            g = torch.randn(2, hq, S_PAD, 8)
            mask, seg = allowed(valid, causal, lengths, keys)
            ref = reference(q, k, v, g, valid, mask)
            mine = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = cp.attention(*mine, valid_len=valid, causal=causal, segment_ids=seg, key_mask=keys)
            (out * g).sum().backward()
            for got, want in zip((out.detach(), *(t.grad for t in mine)), ref):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cp.bytes_sent == 0


def test_math_block_kernel_matches_fused_with_empty_rows():
    """The math fallback (used off CPU) and torch's CPU flash op agree on out, lse and grads,
    including rows the block mask hides entirely (out 0, lse -inf)."""
    torch.manual_seed(0)
    q, do = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.rand(6, 5) > 0.4
    mask[2] = False  # a row with no key in this block
    mask[3, 1] = True
    for blk in (_Block(6, 5, False, mask), _Block(6, 5, True, None), _Block(6, 5, False, None)):
        (o_f, l_f), (o_m, l_m) = (block_forward(q, k, v, blk, 0.3, fused) for fused in (True, False))
        torch.testing.assert_close(o_m, o_f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l_m, l_f, atol=1e-5, rtol=1e-5)
        assert torch.isneginf(l_f[:, :, 2]).all() == (blk.mask is not None)
        lse = torch.where(torch.isinf(l_f), 0.0, l_f)  # backward takes a finite (global) lse
        grads = [block_backward(do, q, k, v, o_f, lse, blk, 0.3, fused) for fused in (True, False)]
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_half_precision_close_to_fp32():
    """bf16 through the fused path: dtype preserved, close to the fp32 reference, padding rows 0."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, S_PAD, 8, requires_grad=True) for _ in range(3))
    valid, causal, lengths, keys = MASKS["causal_packed"]
    mask, seg = allowed(valid, causal, lengths, keys)
    ref_out = reference(q, k, v, torch.ones(2, 4, S_PAD, 8), valid, mask)[0]
    out = ContextParallel(None, None).attention(
        *(t.detach().bfloat16() for t in (q, k, v)), valid_len=valid, causal=causal, segment_ids=seg
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)
    assert (out[:, :, valid:] == 0).all()


def test_errors_name_the_field():
    cp = ContextParallel(None, None)
    cp.check_heads(8, 2)  # Ulysses degree 1: any GQA layout passes
    with pytest.raises(ValueError, match="num_heads % num_kv_heads"):
        cp.check_heads(8, 3)
    cp.ulysses_size = 4  # what a Ulysses group of 4 would give (the worker checks real groups)
    with pytest.raises(ValueError, match=r"parallel\.cp: the Ulysses degree 4 .* kv heads \(2\).*\[1, 2\]"):
        cp.check_heads(8, 2)
    cp.ring_group = object()  # hybrid: the Ulysses size is parallel.ulysses_degree
    with pytest.raises(ValueError, match=r"parallel\.ulysses_degree: the Ulysses degree 4"):
        cp.check_heads(6, 6)
    cp = ContextParallel(None, None)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="valid_len=0"):
        cp.attention(q, q, q, valid_len=0)
    with pytest.raises(ValueError, match=r"segment_ids shape \(7,\) must be \(8,\)"):
        cp.attention(q, q, q, segment_ids=torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="S_loc"):
        cp.attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="ring_window=2"):
        ContextParallel(None, None, ring_window=2)
    with pytest.raises(ValueError, match="kernel='flash'"):
        ContextParallel(None, None, kernel="flash")
    with pytest.raises(ValueError, match="merge='exact'"):
        ContextParallel(None, None, merge="exact")
    with pytest.raises(ValueError, match="merge='gather' supports end padding only"):
        ContextParallel(None, None, merge="gather").attention(q, q, q, causal=True)
    with pytest.raises(ValueError, match="merge='gather' supports end padding only"):
        key_mask = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
        ContextParallel(None, None, merge="gather").attention(q, q, q, key_mask=key_mask)
