"""CFG cache: on scheduled steps the unconditional branch is not run.

The guidance sampler calls the model for "cond" then "uncond" at each step (`samplers.cfg_velocity`).
On a cached step the uncond call returns the current cond prediction plus the uncond - cond difference
of the last computed step (`reuse="delta"`, which follows the cond prediction as it moves), or the last
uncond prediction itself (`reuse="output"`). Steps count uncond calls; the cond branch always runs.
It combines with a block cache (install the block cache first).

Under CFG parallelism (`guidance.cfg_peers`) the uncond half never sees a cond call, so the cond half
sends its prediction to the uncond half at every step (one latent-sized broadcast in the pair) and the
uncond half applies the same rule with it: the reuse is decided and computed in one place, and the
prediction exchange that follows gives both halves the same uncond prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from mmkit.infer.accel.cache.common import (
    CountBlock,
    check_schedule,
    repeated_blocks,
    scheduled_cache_step,
    step_counter,
)
from mmkit.infer.accel.hooks import HookRegistry, ModelHook, register
from mmkit.infer.guidance import current_cfg_branch, current_cfg_peers

HOOK = "mmkit_cache_cfg"
REUSE = ("delta", "output")


@dataclass
class CFGCacheConfig:
    """Uncond steps [step_start, step_end), recomputed every `step_interval`.

    Example: `CFGCacheConfig(step_start=10, step_interval=2, step_end=45, reuse="delta")`.
    """

    step_start: int = 10
    step_interval: int = 2
    step_end: int = 45
    reuse: str = "delta"
    method = "cfg"

    def validate(self) -> CFGCacheConfig:
        check_schedule(self, "cfg_cache")
        if self.reuse not in REUSE:
            raise ValueError(f"cfg_cache.reuse={self.reuse!r}: choose one of {REUSE}")
        return self

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


class _CFGHook(ModelHook):
    """On the transformer, inside the StepCounter; stores per-branch outputs in the counter's state."""

    def __init__(self, counter, cfg: CFGCacheConfig, num_blocks: int):
        self.counter, self.cfg, self.n = counter, cfg, num_blocks

    def new_forward(self, module: nn.Module, *args, **kwargs) -> torch.Tensor:
        s, cfg = self.counter.state, self.cfg
        branch = current_cfg_branch()
        cond = self.counter.state_for("cond")
        peers = current_cfg_peers()
        if branch == "uncond" and s.get("cfg_delta") is not None:
            if scheduled_cache_step(s["step"], cfg.step_start, cfg.step_interval, cfg.step_end):
                if peers is not None:  # the cond half's prediction of this step
                    cond["cfg_out"] = _from_cond_half(torch.empty_like(s["cfg_delta"]), peers)
                self.counter.stats.blocks_skipped += self.n
                if cfg.reuse == "output":
                    return s["cfg_last"]
                return cond["cfg_out"] + s["cfg_delta"]  # (B, C, T, H, W)
        out = self.call_inner(*args, **kwargs)
        if peers is not None:  # cond half: send; uncond half: receive
            v_c = _from_cond_half(out.contiguous() if branch == "cond" else torch.empty_like(out), peers)
            if branch == "uncond":
                cond["cfg_out"] = v_c
        if branch == "cond":
            s["cfg_out"] = out
        elif branch == "uncond" and cond.get("cfg_out") is not None:
            s["cfg_delta"], s["cfg_last"] = out - cond["cfg_out"], out
        return out


def _from_cond_half(buf: torch.Tensor, peers: tuple) -> torch.Tensor:
    """The cond half's prediction of this step, broadcast in the CFG-parallel pair (in place in `buf`)."""
    import torch.distributed as dist

    group, cond_rank = peers
    dist.broadcast(buf, src=cond_rank, group=group)
    return buf


def apply_cfg_cache(transformer: nn.Module, cfg: CFGCacheConfig) -> None:
    """Install the CFG cache on `transformer`; `remove_cache(transformer)` undoes it.

    Example: `apply_cfg_cache(pipe.transformer, CFGCacheConfig(10, 2, 45))`.
    """
    cfg.validate()
    counter = step_counter(transformer)
    blocks = repeated_blocks(transformer)
    register(transformer, _CFGHook(counter, cfg, len(blocks)), HOOK)
    for block in blocks:
        if HookRegistry.get(block) is None:  # no block cache counts its evaluations
            register(block, CountBlock(counter), HOOK)
