"""The trainer's `checkpoint.*` policy: when to save, what to resume from, the resolved config beside.

The on-disk format (DCP shards, `latest`, train_state.json, atomic publish) is `mmkit.checkpoint.dcp`'s;
this file only decides when it is used.

Example:
    >>> ckpt = CheckpointManager(cfg.checkpoint, config=cfg)
    >>> resumed = ckpt.resume(model, optimizer, scheduler, ema=ema)       # None on a fresh run
    >>> start = resumed.step if resumed else 0
    >>> for step in range(start + 1, cfg.train.steps + 1):
    ...     ...
    ...     ckpt.maybe_save(step, cfg.train.steps, model, optimizer, scheduler, ema=ema,
    ...                     data_state={"samples_seen": step * cfg.train.global_batch})
"""

from __future__ import annotations

from pathlib import Path

from mmkit.checkpoint.dcp import (
    ResumeState,
    clean_tmp,
    find_latest,
    load_checkpoint,
    rank_world,
    resolve_step_dir,
    save_checkpoint,
)


class CheckpointManager:
    """`checkpoint.*` config applied: when to save, what to resume from, the resolved config beside.

    Example:
        >>> ckpt = CheckpointManager(cfg.checkpoint, config=cfg)
        >>> st = ckpt.resume(model, opt, sched, ema=ema)          # ResumeState or None
        >>> ckpt.maybe_save(step, cfg.train.steps, model, opt, sched, ema=ema, data_state=pos)
    """

    def __init__(self, cfg, config=None):
        self.cfg, self.config = cfg, config
        self.dir = Path(cfg.dir) if cfg.dir else None
        if self.dir is not None and config is not None and rank_world()[0] == 0:
            from mmkit.config import save_resolved

            save_resolved(config, self.dir)

    def resume_path(self) -> Path | None:
        """What `checkpoint.resume` points at: auto -> latest in dir (or None), none -> None, a path -> it."""
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode == "auto":
            return find_latest(self.dir) if self.dir is not None else None
        return resolve_step_dir(mode)

    def resume(self, model, optimizer=None, scheduler=None, *, ema=None) -> ResumeState | None:
        """Load the checkpoint `resume_path()` names into the live objects; None when starting fresh."""
        if self.dir is not None and rank_world()[0] == 0:
            clean_tmp(self.dir)
        path = self.resume_path()
        if path is None:
            return None
        return load_checkpoint(
            path, model, optimizer, scheduler, ema=ema, load_optim=not self.cfg.no_load_optim
        )

    def should_save(self, step: int, total_steps: int) -> bool:
        """True every `interval` steps and at the last step (when a dir is set)."""
        if self.dir is None:
            return False
        return step == total_steps or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    def maybe_save(
        self, step, total_steps, model, optimizer=None, scheduler=None, *, ema=None, data_state=None
    ):
        """Save if `should_save(step, total_steps)`; returns the step folder or None."""
        if not self.should_save(step, total_steps):
            return None
        return save_checkpoint(
            self.dir,
            step,
            model,
            optimizer,
            scheduler,
            ema=ema,
            data_state=data_state,
            save_rng=not self.cfg.no_save_rng,
            keep_last=self.cfg.keep_last,
            config=self.config,
        )
