"""Linear layers with the activation fused into the GEMM, on a kernel picked per device.

`Linear` is a drop-in `nn.Linear` (same parameters, same state-dict keys) with an optional
activation. On CPU inference it calls oneDNN's linear with a fused epilogue (bias and GELU are
applied while the output tile is still in cache, instead of in extra passes over memory); it
measured 10-20% faster than `addmm` for fp32 DiT shapes on a 2-core x86 machine and equal in bf16,
where the GELU fusion still saves a pass (bf16 only on CPUs whose oneDNN supports it). Inputs of fewer than `MIN_ROWS` rows (token-by-token
decode) are memory-bound GEMVs where PyTorch's default BLAS path is as fast or faster, so they stay
on it, as do training (autograd), other devices and builds without oneDNN. `MMKIT_ONEDNN=0` (or
`ops.ONEDNN = False`) turns the fast path off.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    _linear_pointwise = torch.ops.mkldnn._linear_pointwise
    _ONEDNN = torch.backends.mkldnn.is_available() and os.environ.get("MMKIT_ONEDNN", "1") != "0"
except (AttributeError, RuntimeError):  # a torch build without oneDNN
    _linear_pointwise, _ONEDNN = None, False
ONEDNN = _ONEDNN  # public switch (benchmarks compare both paths)
try:  # oneDNN's bf16 GEMM needs AVX512-BF16 / AMX (or AVX512 emulation); without it the primitive cannot be built
    _BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
except (AttributeError, RuntimeError):
    _BF16 = False
MIN_ROWS = 16

# act name -> (oneDNN post-op, algorithm, eager fallback)
_ACTS = {
    None: ("none", "", None),
    "gelu_tanh": ("gelu", "tanh", lambda y: F.gelu(y, approximate="tanh")),
    "gelu": ("gelu", "none", F.gelu),
    "silu": ("swish", "", F.silu),
}


def _fast_path(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        ONEDNN
        and type(x) is torch.Tensor  # not a distributed tensor (tensor-parallel plans use F.linear)
        and type(w) in (torch.Tensor, nn.Parameter)
        and x.device.type == "cpu"
        and x.numel() >= MIN_ROWS * x.shape[-1]
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _BF16))
        and x.dtype == w.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None = None
) -> torch.Tensor:
    """act(x @ weight.T + bias). Example: `h = linear(x, fc1.weight, fc1.bias, "gelu_tanh")`."""
    post, algo, fallback = _ACTS[act]
    if _fast_path(x, weight):
        return _linear_pointwise(x.contiguous(), weight, bias, post, [], algo)
    y = F.linear(x, weight, bias)
    return fallback(y) if fallback is not None else y


class Linear(nn.Linear):
    """`nn.Linear` with an optional fused activation (`None`, "gelu_tanh", "gelu", "silu")."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str | None = None, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        if act not in _ACTS:
            raise ValueError(f"act={act!r}: choose one of {list(_ACTS)}")
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.act)
