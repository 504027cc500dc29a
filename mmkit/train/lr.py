"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr` or a constant rate.

The rate used by optimizer step `s` (0-based; call `scheduler.step()` once after each optimizer
step) is `optim.lr * lr_factor(s, ...)`:
- warmup, s < W:  lr * (s + 1) / W               (the first step already moves, step W-1 is at lr)
- cosine, s >= W: min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (s - W) / (T - W), p <= 1
- constant:       lr
with W = warmup_steps and T = train.steps. The scheduler is a `LambdaLR`, so its state_dict is
plain numbers and resumes exactly.
"""

from __future__ import annotations

import math

import torch


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based). `min_ratio` = min_lr / lr.

    Example: `lr_factor(0, warmup_steps=10, total_steps=100)` -> `0.1`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"optim.schedule={schedule!r}: choose cosine or constant")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor` for an `OptimConfig` (warmup_steps, schedule, lr, min_lr).

    Example: `sched = build_lr_scheduler(opt, cfg.optim, cfg.train.steps)`; after each
    `opt.step()`, call `sched.step()`.
    """
    min_ratio = cfg.min_lr / cfg.lr
    warmup, schedule = cfg.warmup_steps, cfg.schedule

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total_steps, schedule, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
