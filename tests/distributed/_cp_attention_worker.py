"""torchrun worker for test_cp_attention.py: context-parallel attention == full attention.

Usage: `torchrun --nproc_per_node 4 tests/distributed/_cp_attention_worker.py hybrid ring ring_w2`.
Every layout runs every mask (none, padding, causal, causal + packed samples, packed samples, per-sample
key masks with and without causal), MHA
and GQA where the heads allow, with both block kernels: the output shard and the q/k/v gradient
shards must match torch's SDPA on the gathered sequence (fp32, 1e-5), and bytes_sent must equal
the theoretical volume exactly; merge="gather" must give one SDPA call's output bit for bit. Rank 0 prints one `MAXERR` and one `BYTES` line per layout.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from mmkit.parallel.sequence import ContextParallel

B, D, S_PAD = 2, 8, 16
TOL = {"atol": 1e-5, "rtol": 1e-5}
# per-sample key masks (B, S_PAD): sample 0 drops three scattered keys, sample 1 a whole 4-token shard;
# both drop keys 12 and 13, so with 4 ranks the last shard's block is masked for every sample
KEYS = torch.ones(B, S_PAD, dtype=torch.bool)
KEYS[0, [2, 3, 9]] = False
KEYS[1, 4:8] = False
KEYS[:, 12:14] = False
# mask name -> (valid_len, causal, packed sample lengths or None, key mask or None); padding: segment id -1
MASKS = {
    "none": (S_PAD, False, None, None),
    "padded": (13, False, None, None),  # 13 real tokens padded to 16
    "causal": (11, True, None, None),  # with 4 ranks the last shard is all padding
    "causal_packed": (14, True, (3, 7, 4), None),
    "packed": (14, False, (3, 7, 4), None),
    "keys": (14, False, None, KEYS),
    "causal_keys": (15, True, None, KEYS),
}


def layout(name: str, world: int) -> tuple[int, int, int | None]:
    """Layout name -> (ring size, Ulysses size, ring window)."""
    return {
        "ulysses": (1, world, None),
        "ring": (world, 1, None),
        "ring_w2": (world, 1, 2),
        "ring_w1": (world, 1, 1),
        "hybrid": (2, world // 2, None),
    }[name]


def allowed(valid: int, causal: bool, lengths, keys) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(valid, valid) (or (B, 1, valid, valid) with `keys`) bool mask of the real tokens, and the (S_PAD,)
    segment ids (or None)."""
    mask = torch.ones(valid, valid, dtype=torch.bool)
    if keys is not None:
        mask = mask & keys[:, None, None, :valid]
    if causal:
        mask = mask.tril()
    seg = None
    if lengths is not None:
        seg = torch.full((S_PAD,), -1, dtype=torch.long)
        seg[: sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        mask &= seg[:valid, None] == seg[None, :valid]
    return mask, seg


def reference(q, k, v, g, valid, mask):
    """Full attention on the real tokens; padded rows of out and of all grads are zero."""
    rep = q.shape[1] // k.shape[1]
    qv, kv, vv = (t[:, :, :valid] for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        qv, kv.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1), attn_mask=mask
    )
    (out * g[:, :, :valid]).sum().backward()
    return F.pad(out.detach(), (0, 0, 0, S_PAD - valid)), q.grad, k.grad, v.grad


def expected_bytes(cp: ContextParallel, hq: int, hkv: int, elt: int = 4) -> tuple[int, int]:
    """Theoretical bytes one rank sends in forward and in backward.

    Ulysses: q, k, v and out (fwd) / their grads (bwd), each rank keeping 1/u of every all-to-all:
    (u-1)/u * S_loc * D * B * (2*Hq + 2*Hkv) elements -- 4*S*d/p*(u-1)/u for MHA.
    Ring (R ranks, chunk C = u*S_loc, Hkv/u heads): fwd R-1 k/v blocks (2*S*d*(R-1)/R per rank for
    MHA); bwd the same plus R fp32 dk/dv accumulator hops.
    """
    u, R = cp.ulysses_size, cp.ring_size
    s_loc = S_PAD // cp.size
    uly = (u - 1) * s_loc * D * B * (2 * hq + 2 * hkv) * elt // u
    kv_block = 2 * B * (hkv // u) * (u * s_loc) * D  # elements of one (k, v) block
    ring_fwd = (R - 1) * kv_block * elt
    ring_bwd = ring_fwd + (R * kv_block * 4 if R > 1 else 0)
    return uly + ring_fwd, uly + ring_bwd


def run_layout(name: str) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    ring, uly, window = layout(name, world)
    mesh = init_device_mesh("cpu", (ring, uly), mesh_dim_names=("cp_ring", "cp_ulysses"))
    groups = (
        mesh.get_group("cp_ulysses") if uly > 1 else None,
        mesh.get_group("cp_ring") if ring > 1 else None,
    )
    cps = {
        kernel: ContextParallel(*groups, ring_window=window, kernel=kernel) for kernel in ("fused", "math")
    }
    cp = cps["fused"]
    assert cp.size == world and cp.rank == rank, (cp.size, cp.rank, rank)  # mesh order = global cp rank
    s_loc = S_PAD // world
    rows = slice(rank * s_loc, (rank + 1) * s_loc)
    head_sets = [(4, 4)] + ([(4, 2)] if 2 % uly == 0 else [])  # GQA where kv heads split over u
    maxerr = {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
    bytes_seen = set()
    for seed, (mask_name, (valid, causal, lengths, keys)) in enumerate(MASKS.items()):
        for hq, hkv in head_sets:
            torch.manual_seed(1000 + seed)  # identical full tensors on every rank
            q, k, v = (torch.randn(B, h, S_PAD, D, requires_grad=True) for h in (hq, hkv, hkv))
            g = torch.randn(B, hq, S_PAD, D)
            mask, seg = allowed(valid, causal, lengths, keys)
            ref = reference(q, k, v, g, valid, mask)
            for kernel, cpk in cps.items():
                shards = [t[:, :, rows].detach().clone().requires_grad_() for t in (q, k, v)]
                before = cpk.bytes_sent
                out = cpk.attention(*shards, valid_len=valid, causal=causal, segment_ids=seg, key_mask=keys)
                fwd = cpk.bytes_sent - before
                (out * g[:, :, rows]).sum().backward()
                bwd = cpk.bytes_sent - before - fwd
                where = f"{name} {mask_name} Hq={hq} Hkv={hkv} kernel={kernel} rank={rank}"
                assert (fwd, bwd) == expected_bytes(cpk, hq, hkv), (
                    where,
                    fwd,
                    bwd,
                    expected_bytes(cpk, hq, hkv),
                )
                bytes_seen.add((hq, hkv, fwd, bwd))
                got = (out.detach(), *(t.grad for t in shards))
                for key, mine, full in zip(maxerr, got, ref):
                    want = full[:, :, rows]
                    assert torch.isfinite(mine).all(), f"{where}: {key} not finite"
                    torch.testing.assert_close(
                        mine, want, **TOL, msg=lambda m, w=where, k=key: f"{w} {k}: {m}"
                    )
                    maxerr[key] = max(maxerr[key], (mine - want).abs().max().item())
    errs = torch.tensor(list(maxerr.values()), dtype=torch.float64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(
            f"MAXERR {name} world={world} " + " ".join(f"{k}={e:.2e}" for k, e in zip(maxerr, errs.tolist()))
        )
        for hq, hkv, fwd, bwd in sorted(bytes_seen):
            print(f"BYTES {name} world={world} Hq={hq} Hkv={hkv} S={S_PAD} D={D} B={B} fwd={fwd} bwd={bwd}")
    check_gather(groups, window, name)
    check_errors(cp, groups, name)


def check_gather(groups, window, name: str) -> None:
    """merge="gather" (inference): the output shard is bit for bit one SDPA call on the real tokens.
    Head dim 32 (Wan's are 128, the tiny test model's 32) and at least 4 real query rows per rank: as
    measured, head dim 8 at odd key counts, or 1-3 query rows (other GEMM kernels), round differently
    from the whole-sequence call (~2e-7)."""
    rank = dist.get_rank()
    cp = ContextParallel(*groups, ring_window=window, merge="gather")
    s_pad = 32
    s_loc = s_pad // cp.size
    for valid in (s_pad, 29):  # unpadded; 29 real tokens padded to 32 (the last of 4 ranks: 5 real rows)
        torch.manual_seed(7)
        q, k, v = (torch.randn(B, 4, s_pad, 32) for _ in range(3))
        with torch.no_grad():
            out = cp.attention(
                *(t[:, :, rank * s_loc : (rank + 1) * s_loc] for t in (q, k, v)), valid_len=valid
            )
            want = F.scaled_dot_product_attention(*(t[:, :, :valid] for t in (q, k, v)))
        n = max(0, min(valid - rank * s_loc, s_loc))  # this rank's real rows
        where = f"{name} gather valid={valid} rank={rank}"
        assert torch.equal(out[:, :, :n], want[:, :, rank * s_loc : rank * s_loc + n]), where
        assert not out[:, :, n:].any(), f"{where}: padded rows not zero"


def check_errors(cp: ContextParallel, groups, name: str) -> None:
    """Bad layouts raise one clear ValueError naming the config field."""
    if cp.ulysses_size > 1:
        field = "parallel.cp" if groups[1] is None else "parallel.ulysses_degree"
        try:
            cp.check_heads(6, 3)
        except ValueError as err:
            assert field in str(err) and "6" in str(err) and "3" in str(err), str(err)
        else:
            raise AssertionError(f"{name}: check_heads(6, 3) passed with Ulysses degree {cp.ulysses_size}")
    if cp.ring_size == 4:
        try:
            ContextParallel(None, groups[1], ring_window=3)
        except ValueError as err:
            assert "parallel.ring_window=3" in str(err), str(err)
        else:
            raise AssertionError("ring_window=3 on a ring of 4 was accepted")


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for name in sys.argv[1:]:
        run_layout(name)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
