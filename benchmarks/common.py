"""Shared benchmark utilities: interleaved best-of timing and the machine's matmul peak."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def interleaved_best(
    fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1
) -> dict[str, float]:
    """Run each fn `warmup` times, then `repeats` rounds of all fns in turn; best seconds per fn.

    Interleaving makes both sides see the same machine noise (this CPU is shared).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` (best of `repeats`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
