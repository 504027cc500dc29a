"""DiTCache: skip a fixed range of blocks on scheduled steps, adding the residual they last produced.

MindIE SD's `dit_block_cache` with its names and meaning: on steps in [step_start, step_end) except
every `step_interval`-th one (counted from step_start, which is computed), blocks
[block_start, block_end) are not run; the residual they added at the last computed step (the "bias",
output of block_end-1 minus input of block_start) is added instead. Steps count model calls per
guidance branch, so cond and uncond keep their own bias. MindIE's Wan2.1 setting is
`DiTCacheConfig(step_start=20, step_interval=2, step_end=47, block_start=10, block_end=30)`.
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

HOOK = "mmkit_cache_dit"


@dataclass
class DiTCacheConfig:
    """Steps [step_start, step_end), recomputed every `step_interval`; blocks [block_start, block_end).

    Example: `DiTCacheConfig(step_start=20, step_interval=2, step_end=47, block_start=10, block_end=30)`.
    """

    step_start: int = 20
    step_interval: int = 2
    step_end: int = 47
    block_start: int = 10
    block_end: int = 30
    method = "dit"

    def validate(self, num_blocks: int) -> DiTCacheConfig:
        check_schedule(self, "dit_cache")
        if not (0 <= self.block_start < self.block_end <= num_blocks):
            raise ValueError(
                f"dit_cache.block_start={self.block_start}, block_end={self.block_end}: need "
                f"0 <= block_start < block_end <= {num_blocks} (the model's block count)"
            )
        return self

    def is_cached(self, step: int) -> bool:
        return scheduled_cache_step(step, self.step_start, self.step_interval, self.step_end)

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


class _DiTBlockHook(ModelHook):
    """On one block of the cached range; reads and writes the branch's state on the StepCounter."""

    def __init__(self, counter, cfg: DiTCacheConfig, index: int):
        self.counter, self.cfg, self.index = counter, cfg, index

    def new_forward(self, module: nn.Module, x, *rest, **kwargs):
        s, cfg, stats = self.counter.state, self.cfg, self.counter.stats
        first, last = self.index == cfg.block_start, self.index == cfg.block_end - 1
        if cfg.is_cached(s["step"]) and s.get("dit_bias") is not None:
            stats.blocks_skipped += 1
            return x + s["dit_bias"] if first else x  # (B, S, D): the range's residual is added once
        stats.blocks_run += 1
        if first:
            s["dit_in"] = x if cfg.step_start <= s["step"] < cfg.step_end else None
        out = self.call_inner(x, *rest, **kwargs)
        if last and s.get("dit_in") is not None:
            s["dit_bias"] = out - s.pop("dit_in")  # what blocks [block_start, block_end) added
        return out


def apply_dit_cache(transformer: nn.Module, cfg: DiTCacheConfig) -> None:
    """Install DiTCache on `transformer` (its `_repeated_blocks`); `remove_cache(transformer)` undoes it.

    Example: `apply_dit_cache(pipe.transformer, DiTCacheConfig(20, 2, 47, 10, 30))`.
    """
    blocks = repeated_blocks(transformer)
    cfg.validate(len(blocks))
    counter = step_counter(transformer)
    for i, block in enumerate(blocks):
        inside = cfg.block_start <= i < cfg.block_end
        register(block, _DiTBlockHook(counter, cfg, i) if inside else CountBlock(counter), HOOK)
