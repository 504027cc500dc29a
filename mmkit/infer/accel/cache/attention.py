"""AttentionCache: reuse every block's self-attention output on scheduled steps.

MindIE SD's AttentionCache (`--use_attentioncache --start_step 20 --attentioncache_interval 2
--end_step 47`): on steps in [step_start, step_end) except every `step_interval`-th one (counted from
step_start, which is computed), each block's self-attention module returns the output it produced at
the last computed step instead of running; the rest of the block (cross-attention, MLP) runs. State is
per guidance branch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from mmkit.infer.accel.cache.common import (
    CountBlock,
    check_schedule,
    repeated_blocks,
    scheduled_cache_step,
    step_counter,
)
from mmkit.infer.accel.hooks import ModelHook, register

HOOK = "mmkit_cache_attention"


@dataclass
class AttentionCacheConfig:
    """Steps [step_start, step_end), recomputed every `step_interval`; `attn` names the self-attention
    submodule of each block (Wan: `attn`).

    Example: `AttentionCacheConfig(step_start=20, step_interval=2, step_end=47)`.
    """

    step_start: int = 20
    step_interval: int = 2
    step_end: int = 47
    attn: str = "attn"
    method = "attention"

    def validate(self) -> AttentionCacheConfig:
        check_schedule(self, "attention_cache")
        return self

    def is_cached(self, step: int) -> bool:
        return scheduled_cache_step(step, self.step_start, self.step_interval, self.step_end)

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


class _AttentionHook(ModelHook):
    def __init__(self, counter, cfg: AttentionCacheConfig, index: int):
        self.counter, self.cfg, self.key = counter, cfg, f"attn_out{index}"

    def new_forward(self, module: nn.Module, *args, **kwargs):
        s = self.counter.state
        if self.cfg.is_cached(s["step"]) and s.get(self.key) is not None:
            self.counter.stats.attention_reused += 1
            return s[self.key]  # (B, S, D) from the last computed step
        out = self.call_inner(*args, **kwargs)
        if self.cfg.step_start <= s["step"] < self.cfg.step_end:
            s[self.key] = out
        return out


def apply_attention_cache(transformer: nn.Module, cfg: AttentionCacheConfig) -> None:
    """Install AttentionCache; `remove_cache(transformer)` undoes it.

    Example: `apply_attention_cache(pipe.transformer, AttentionCacheConfig(20, 2, 47))`.
    """
    cfg.validate()
    blocks = repeated_blocks(transformer)
    attns = [getattr(b, cfg.attn, None) for b in blocks]
    if not all(isinstance(a, nn.Module) for a in attns):
        raise ValueError(
            f"attention_cache.attn={cfg.attn!r}: {type(blocks[0]).__name__} has no such submodule "
            "(name the block's self-attention module)"
        )
    counter = step_counter(transformer)
    for i, (block, attn) in enumerate(zip(blocks, attns)):
        register(attn, _AttentionHook(counter, cfg, i), HOOK)
        register(block, CountBlock(counter), HOOK)
