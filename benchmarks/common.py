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


def transformers_qwen_twin(ours, cfg):
    """transformers' Qwen2_5_VLForConditionalGeneration holding exactly the tensors of mmkit model
    `ours` (no second copy; built on meta, then assigned). Tied LM head, as in the 3B checkpoint."""
    from transformers import Qwen2_5_VLConfig as HFConfig
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mmkit.models.qwen2_5_vl.hf import to_hf

    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    with torch.device("meta"):
        ref = Qwen2_5_VLForConditionalGeneration(hf_cfg)
    missing, unexpected = ref.load_state_dict(to_hf(ours.state_dict(), cfg), strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ref.lm_head.weight = ref.model.language_model.embed_tokens.weight
    for mod in ref.modules():  # rotary inverse frequencies are buffers left on meta: rebuild on CPU
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                rope = (
                    mod.compute_default_rope_parameters
                    if hasattr(mod, "mrope_section")
                    else mod.compute_axial_rope_parameters
                )
                mod.register_buffer(name, rope(mod.config)[0], persistent=False)
    return ref
