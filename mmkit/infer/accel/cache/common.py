"""What every step cache shares: the step counter on the transformer, the repeated blocks, skip counts.

A cache is installed from outside (`hooks.py`): a `StepCounter` on the transformer counts the model
calls of each classifier-free-guidance branch (one call per sampling step and branch) and holds that
branch's cache state (residuals, the last signal, ...); the technique's hooks on the blocks read it.
`reset_all(transformer)` at generation start drops every branch's state and zeroes the skip counts.

This file holds no technique; each lives in its own file (dit.py, attention.py, adaptive.py, cfg.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmkit.infer.accel.hooks import HookRegistry, ModelHook

COUNTER = "mmkit_step_counter"  # hook name of the StepCounter on the transformer


@dataclass
class SkipStats:
    """Block evaluations of one generation (all branches): run, skipped, and attention outputs reused."""

    blocks_run: int = 0
    blocks_skipped: int = 0
    attention_reused: int = 0

    @property
    def skipped_fraction(self) -> float:
        total = self.blocks_run + self.blocks_skipped
        return self.blocks_skipped / total if total else 0.0

    def summary(self) -> str:
        total = self.blocks_run + self.blocks_skipped
        text = f"{self.blocks_skipped}/{total} DiT block evaluations skipped ({self.skipped_fraction:.1%})"
        if self.attention_reused:
            text += f", {self.attention_reused} self-attention outputs reused"
        return text


class StepCounter(ModelHook):
    """On the transformer: `state["step"]` is the index of the call in progress (0-based) for the
    current guidance branch, `state["t"]` its timestep (float); techniques keep their per-branch
    tensors in the same dict. `stats` counts over all branches since the last reset."""

    def __init__(self):
        self.stats = SkipStats()

    def init_state(self) -> dict:
        return {"step": -1, "t": None}

    def reset_state(self) -> None:
        super().reset_state()
        self.stats = SkipStats()

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        s = self.state
        s["step"] += 1
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        s["t"] = float(torch.as_tensor(t).reshape(-1)[0]) if t is not None else float(s["step"])
        return args, kwargs


def step_counter(transformer: nn.Module) -> StepCounter:
    """The transformer's StepCounter, installed (outermost) on first use.

    Example: `step_counter(pipe.transformer).stats.summary()` after a cached generation.
    """
    reg = HookRegistry.get_or_create(transformer)
    hook = reg.get_hook(COUNTER)
    if hook is None:
        if reg.hooks:  # the counter must see every call before any technique replaces it
            raise ValueError(
                f"install caches before other hooks on {type(transformer).__name__} (found {list(reg.hooks)})"
            )
        hook = StepCounter()
        reg.register_hook(hook, COUNTER)
    return hook


def repeated_blocks(transformer: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks (first name in its `_repeated_blocks`), e.g. `WanTransformer.blocks`.

    Each block is called as `block(x, *rest)` and returns the new x; caches rely on nothing else.
    """
    names = getattr(transformer, "_repeated_blocks", None)
    blocks = getattr(transformer, names[0], None) if names else None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"{type(transformer).__name__}: step caches need `_repeated_blocks` naming a non-empty ModuleList"
        )
    return blocks


def scheduled_cache_step(step: int, step_start: int, step_interval: int, step_end: int) -> bool:
    """True when `step` reuses the cache: inside [step_start, step_end) and not one of the
    every-`step_interval`-th recomputed steps (step_start itself is computed, so the cache is filled).

    Example: `[s for s in range(10) if scheduled_cache_step(s, 2, 2, 8)] == [3, 5, 7]`.
    """
    return step_start <= step < step_end and (step - step_start) % step_interval != 0


def check_schedule(cfg, name: str) -> None:
    """Clear errors for impossible step fields of a scheduled cache config."""
    for field in ("step_start", "step_interval", "step_end"):
        v = getattr(cfg, field)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name}.{field}={v!r}: must be an integer")
    if cfg.step_start < 0:
        raise ValueError(f"{name}.step_start={cfg.step_start}: must be >= 0")
    if cfg.step_interval < 1:
        raise ValueError(f"{name}.step_interval={cfg.step_interval}: must be >= 1 (1 caches nothing)")
    if cfg.step_end <= cfg.step_start:
        raise ValueError(
            f"{name}.step_end={cfg.step_end}: must be > step_start={cfg.step_start} (the cache works on "
            "steps [step_start, step_end))"
        )


class CountBlock(ModelHook):
    """On a block no technique skips: counts its evaluations only."""

    def __init__(self, counter: StepCounter):
        self.counter = counter

    def pre_forward(self, module, *args, **kwargs):
        self.counter.stats.blocks_run += 1
        return args, kwargs
