"""The attention entry point every mmkit model calls.

One function, so that a backend (SDPA's dispatcher by default; single SDPA kernels, flex_attention,
flash-attn, SageAttention chosen by `attention_backends`; ring/Ulysses wrappers from `parallel/`) can
be swapped in one place without touching model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkit.models.common import attention_backends as backends


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, S, D) tensors; returns (B, H, Sq, D).

    `k`/`v` may have fewer heads than `q` (grouped-query attention); the kernel shares them across
    query-head groups without copying.
    `backend`: None (the process default, `attention_backends.configure`; initially "sdpa", PyTorch's
    own dispatcher), "auto" / "runtime" / "static", or a candidate name ("math", "flash", ...); the
    environment variable MMKIT_ATTENTION_BACKEND overrides it. Masked, causal and grouped-query calls
    always take "sdpa".
    Example: `out = attention(q, k, v, backend="auto")  # q,k,v: (1, 12, 1950, 128)`.
    """
    gqa = k.shape[1] != q.shape[1]
    if mask is None and not is_causal and not gqa:
        name = backends.resolve(q, k, v, scale, backend)
        if name != "sdpa":
            return backends.BACKENDS[name].fn(q, k, v, scale)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )
