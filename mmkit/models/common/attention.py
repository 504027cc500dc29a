"""The attention entry point every mmkit model calls.

One function, so that a backend (SDPA today; flash/ring/Ulysses wrappers from `parallel/` and
`infer/accel/`) can be swapped in one place without touching model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, S, D) tensors; returns (B, H, Sq, D).

    `k`/`v` may have fewer heads than `q` (grouped-query attention); the kernel shares them across
    query-head groups without copying.
    Example: `out = attention(q, k, v)  # q,k,v: (1, 12, 1950, 128)`.
    """
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )
