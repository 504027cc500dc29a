"""Exact greedy decoding that reads the output matrix at half the bytes.

Token-by-token decode is memory-bound, and for a VLM the output matrix (vocab x hidden, 151936 x
2048 floats = 1.2 GB for Qwen2.5-VL-3B) is most of the bytes read per token. Greedy decoding needs
only the argmax of the fp32 logits, not the logits themselves, so:

1. screen all tokens with a bf16 copy of the matrix (half the bytes; AVX512-BF16 / tensor cores),
2. bound each screened logit's error rigorously (weight rounding, input rounding, fp32
   accumulation, output rounding), keep every token whose upper bound reaches the best lower bound,
3. compute the exact fp32 logits of those few candidates and take their argmax.

The chosen token is the argmax of the fp32 logits: the bound guarantees the true argmax is among
the candidates, and candidates get exact fp32 dot products. (Only a near-tie within fp32 summation
noise, ~1e-6 relative, could resolve differently than a full fp32 GEMM with another summation order.)
Sampling with temperature > 0 needs the whole distribution and does not use this.
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
import torch.nn.functional as F

_U_BF16 = 2.0**-8  # bf16 unit roundoff (2^-9), doubled for safety
_U_FP32 = 2.0**-24


# output layer -> its ScreenedArgmax tables; weak keys: a dropped model frees its bf16 copy too
_TABLES: weakref.WeakKeyDictionary[torch.nn.Module, ScreenedArgmax] = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


class ScreenedArgmax:
    """argmax(h @ weight.T) for fp32 `weight` (V, D), screened in bf16. Built once per weight
    (`screened_head`); its tensors are never written after construction, so requests share them.

    Example:
        head = ScreenedArgmax(model.language.lm_head.weight)
        token = head(hidden)  # hidden (B, D) float32 -> (B,) int64
    """

    def __init__(self, weight: torch.Tensor, chunk: int = 16384):
        assert weight.dtype == torch.float32 and weight.ndim == 2
        self.weight = weight
        self.low = weight.detach().to(torch.bfloat16)
        err, norm = [], []
        for i in range(0, weight.shape[0], chunk):  # bounded scratch memory
            lo = self.low[i : i + chunk].float()
            err.append((weight[i : i + chunk].detach() - lo).norm(dim=1))
            norm.append(lo.norm(dim=1))
        self.err = torch.cat(err)  # (V,) ||w_v - bf16(w_v)||
        self.norm = torch.cat(norm)  # (V,) ||bf16(w_v)||
        self.dim = weight.shape[1]
        self.last_candidates = 0  # for tests/benchmarks: how many rows were recomputed exactly

    def for_request(self) -> ScreenedArgmax:
        """The same read-only tables with a `last_candidates` of its own (one per request)."""
        other = copy.copy(self)
        other.last_candidates = 0
        return other

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        h_lo = h.to(torch.bfloat16)
        approx = F.linear(h_lo, self.low).float()  # (B, V)
        h_n = h.norm(dim=-1, keepdim=True)
        d_n = (h - h_lo.float()).norm(dim=-1, keepdim=True)
        lo_n = h_lo.float().norm(dim=-1, keepdim=True)
        # |h.w - bf16 result| <= ||h|| ||w - w_lo|| + ||h - h_lo|| ||w_lo|| + D u32 ||h_lo|| ||w_lo|| + u16 |a|
        bound = 2 * (h_n * self.err + (d_n + self.dim * _U_FP32 * lo_n) * self.norm) + _U_BF16 * approx.abs()
        floor = (approx - bound).amax(dim=-1, keepdim=True)
        cand = approx + bound >= floor  # (B, V)
        out = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
        self.last_candidates = int(cand.sum())
        for b in range(h.shape[0]):
            idx = cand[b].nonzero().squeeze(1)  # ascending, so ties resolve to the lowest id as argmax does
            exact = self.weight[idx] @ h[b]  # fp32 logits of the candidates
            out[b] = idx[exact.argmax()]
        return out


def screened_head(model_head: torch.nn.Linear) -> ScreenedArgmax | None:
    """A ScreenedArgmax for one request on an fp32 output layer, or None where it would not help
    (bf16/fp16 weights are already half the bytes).

    The bf16 copy and norms are built once per weight (rebuilt when the weight tensor is replaced)
    and shared read-only; each call returns its own object, so requests in several threads never
    write to shared state. Nothing is stored on the module.
    Example: `head = screened_head(model.output_head()); token = head(hidden)`.
    """
    w = model_head.weight
    if w.dtype != torch.float32:
        return None
    with _TABLES_LOCK:  # requests starting together build the tables once
        tables = _TABLES.get(model_head)
        if tables is None or tables.weight is not w or tables.low.shape != w.shape:
            tables = ScreenedArgmax(w)
            _TABLES[model_head] = tables
    return tables.for_request()
