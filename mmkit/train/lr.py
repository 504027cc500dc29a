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


class LrSchedule:
    """`lr_factor` as a picklable-free callable whose numbers travel in the scheduler's state_dict.

    `anchor` = (step, factor): a run resumed with a different `train.steps` after warmup continues the
    cosine from the factor it had reached, `min_ratio + (f0 - min_ratio) * (1 + cos(pi * p)) / 2` with
    `p = (step - s0) / (total - s0)`, instead of jumping to where the new length would have put it.
    Example: `LrSchedule(10, 100, "cosine", 0.1)(0)` -> `0.1`.
    """

    def __init__(self, warmup: int, total: int, schedule: str = "cosine", min_ratio: float = 0.0):
        self.warmup, self.total, self.schedule, self.min_ratio = warmup, total, schedule, min_ratio
        self.anchor: list | None = None  # [s0, f0] once a resume changed the length

    def __call__(self, step: int) -> float:
        if self.anchor is None or step < self.anchor[0] or self.schedule != "cosine":
            return lr_factor(step, self.warmup, self.total, self.schedule, self.min_ratio)
        s0, f0 = self.anchor
        progress = min(1.0, (step - s0) / max(1, self.total - s0))
        return self.min_ratio + (f0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def resumed(self, saved: dict | None, step: int) -> str | None:
        """Take over a saved schedule's anchor at `step`; add one when `train.steps` changed past warmup.
        Returns a note on what changed (None when nothing did)."""
        if not saved:
            return None
        old = LrSchedule(saved["warmup"], saved["total"], saved["schedule"], self.min_ratio)
        old.anchor = saved.get("anchor")
        if saved["total"] == self.total:
            self.anchor = old.anchor
            return None
        if step > self.warmup and self.schedule == "cosine":
            self.anchor = [step, old(step)]
            return (
                f"train.steps {saved['total']} -> {self.total}: the cosine continues from the rate reached "
                f"at step {step} ({self.anchor[1]:.4g} x optim.lr) down to optim.min_lr over the new length"
            )
        return f"train.steps {saved['total']} -> {self.total}: the schedule is laid over the new length"


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor` for an `OptimConfig` (warmup_steps, schedule, lr, min_lr).

    Example: `sched = build_lr_scheduler(opt, cfg.optim, cfg.train.steps)`; after each
    `opt.step()`, call `sched.step()`.
    """
    sched = LrSchedule(cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr / cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, sched)


def rebase_scheduler(
    scheduler, optimizer, cfg, total_steps: int, step: int, saved: dict | None
) -> str | None:
    """After loading a checkpoint: the schedule of the current config (`OptimConfig` `cfg`, `total_steps`)
    at `step`, its base rate the config's `optim.lr`.

    Loading a LambdaLR's state restores the saved base rates and the saved `LrSchedule` numbers, so a
    changed `optim.lr` would be ignored while `min_lr / lr` came from the new config. This sets a fresh
    `LrSchedule`, takes over (or adds) the continuation anchor from `saved` (the checkpoint's scheduler
    state) and sets every group's base and current rate. Returns a note when the run's length changed.
    Example: `rebase_scheduler(sched, opt, cfg.optim, cfg.train.steps, 200, saved_scheduler_state)`.
    """
    fn = LrSchedule(cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr / cfg.lr)
    lambdas = (saved or {}).get("lr_lambdas") or [None]
    note = fn.resumed(lambdas[0], step)
    scheduler.lr_lambdas = [fn for _ in optimizer.param_groups]
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    scheduler.last_epoch = step
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr
        g["lr"] = cfg.lr * fn(step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return note
