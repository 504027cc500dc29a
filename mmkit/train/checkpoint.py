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

import json
from pathlib import Path

from mmkit.checkpoint.dcp import (
    STEP_DIR_RE,
    ResumeState,
    clean_tmp,
    find_intact,
    list_checkpoints,
    load_checkpoint,
    rank_world,
    resolve_step_dir,
    save_checkpoint,
    verify_step,
)
from mmkit.config import ConfigError, read_config_file

# Fields a resume refuses to change (past step 0): they reshape the schedule the run has already followed.
_FIXED_ON_RESUME = ("optim.schedule", "optim.warmup_steps")


class CheckpointManager:
    """`checkpoint.*` config applied: when to save, what to resume from, the resolved config beside.

    Saves go to `checkpoint.fork` when set, else `checkpoint.dir`. Nothing is written before `resume`
    has checked the run can continue (the resolved `config.toml` included).

    Example:
        >>> ckpt = CheckpointManager(cfg.checkpoint, config=cfg)
        >>> st = ckpt.resume(model, opt, sched, ema=ema)          # ResumeState or None
        >>> ckpt.maybe_save(step, cfg.train.steps, model, opt, sched, ema=ema, data_state=pos)
    """

    def __init__(self, cfg, config=None):
        self.cfg, self.config = cfg, config
        self.dir = Path(cfg.fork or cfg.dir) if (cfg.fork or cfg.dir) else None  # where saves go
        self.source = Path(cfg.dir) if cfg.dir else None  # where `auto` resumes from

    def latest_step(self) -> Path | None:
        """The newest step folder saves went to (for messages)."""
        steps = list_checkpoints(self.dir) if self.dir is not None else []
        return steps[-1] if steps else None

    def resume_path(self) -> Path | None:
        """What to resume from: a fork that already holds steps continues itself; auto -> the newest intact
        step in dir (damaged newer ones are passed over, with a warning); none -> None; a path -> it."""
        mode = self.cfg.resume
        if self.cfg.fork and list_checkpoints(self.cfg.fork):
            mode = "auto"  # a forked run that was interrupted: continue the fork
            where = Path(self.cfg.fork)
        else:
            where = self.source
        if mode == "none":
            return None
        explicit_dir = (
            mode != "auto" and Path(mode).is_dir() and not (Path(mode) / "train_state.json").is_file()
        )
        if explicit_dir:
            mode, where = "auto", Path(mode)  # a checkpoint dir named explicitly: its newest intact step
        if mode == "auto":
            if where is None:
                return None
            found, skipped = find_intact(where)
            if found is None and explicit_dir and not skipped:
                return resolve_step_dir(where)  # raises: no step folders there
            for line in skipped:
                self._say(f"checkpoint: {line}; falling back to an earlier step")
            if found is None and skipped:
                raise ValueError(
                    f"checkpoint.dir={str(where)!r}: no intact checkpoint to resume from ({skipped[0]}); "
                    "restore the files or start fresh with checkpoint.resume=none and a new checkpoint.dir"
                )
            return found
        step_dir = resolve_step_dir(mode)
        problems = verify_step(step_dir)
        if problems:
            raise ValueError(
                f"checkpoint.resume={mode!r}: {step_dir} is damaged: {'; '.join(problems[:3])}; "
                "resume from an earlier step_N folder"
            )
        return step_dir

    def resume(
        self, model, optimizer=None, scheduler=None, *, ema=None, total_steps=None
    ) -> ResumeState | None:
        """Check, then load the checkpoint `resume_path()` names into the live objects; then write the
        resolved config. None when starting fresh. Raises ValueError naming the field for a resume that
        cannot continue (train.steps not past the saved step, later steps in the folder saves would go to,
        a changed fixed field)."""
        rank = rank_world()[0]
        for d in {self.dir, self.source} - {None}:
            if rank == 0:
                for p in clean_tmp(d):
                    self._say(f"checkpoint: removed {p.name}, an unfinished save")
        path = self.resume_path()
        if path is not None:
            step = self._check_resume(path, total_steps)
        resumed = None
        if path is not None:
            resumed = load_checkpoint(
                path, model, optimizer, scheduler, ema=ema, load_optim=not self.cfg.no_load_optim
            )
        if self.dir is not None and self.config is not None and rank == 0:
            from mmkit.config import save_resolved

            save_resolved(self.config, self.dir)  # only once the run is known to continue
        if resumed is not None and total_steps is not None:
            self._say(f"resumed from {resumed.path} (step {step} of {total_steps})")
        return resumed

    def _check_resume(self, path: Path, total_steps: int | None) -> int:
        """The saved step, after the checks a resume needs (before any tensor is read)."""
        meta = json.loads((path / "train_state.json").read_text())
        step = int(meta["step"])
        if total_steps is not None and total_steps <= step:
            raise ValueError(
                f"train.steps={total_steps}: the checkpoint {path} is already at step {step}; set train.steps "
                f"above {step} to continue it, or checkpoint.resume=none with a new checkpoint.dir to start over"
            )
        if self.dir is not None and path.parent.resolve() == self.dir.resolve():
            later = [p.name for p in list_checkpoints(self.dir) if int(STEP_DIR_RE.match(p.name)[1]) > step]
            later = [n for n in later if not verify_step(self.dir / n, checksums=False)]
            if later:
                raise ValueError(
                    f"checkpoint.resume={str(path)!r}: {self.dir} already holds later steps ({', '.join(later)}) "
                    "of another continuation; saving here would mix the two. Pass --checkpoint.fork NEW_DIR to "
                    "save this continuation elsewhere (or remove the later step folders)"
                )
        self._check_changes(path, step)
        return step

    def _check_changes(self, path: Path, step: int) -> None:
        """Refuse a change of a field the run's schedule already depends on; say which changes apply."""
        if self.config is None or step == 0:
            return
        saved_file = next(
            (d / "config.toml" for d in (path, path.parent) if (d / "config.toml").is_file()), None
        )
        if saved_file is None:
            return
        try:
            saved = read_config_file(saved_file)
        except (ConfigError, OSError, ValueError):
            return  # an unreadable old config says nothing either way
        for name in _FIXED_ON_RESUME:
            section, _, fld = name.partition(".")
            old = saved.get(section, {}).get(fld)
            new = getattr(getattr(self.config, section), fld)
            if old is not None and old != new:
                raise ValueError(
                    f"{name}={new!r}: the checkpoint {path} was trained with {name}={old!r}, and changing it at "
                    f"step {step} would jump the learning rate; keep {old!r}, or start a new run "
                    "(checkpoint.resume=none, a new checkpoint.dir)"
                )
        for name in ("optim.lr", "optim.min_lr"):
            section, _, fld = name.partition(".")
            old = saved.get(section, {}).get(fld)
            new = getattr(getattr(self.config, section), fld)
            if old is not None and float(old) != float(new):
                self._say(f"resume: {name} {old} -> {new}: the schedule is recomputed from the new value")

    @staticmethod
    def _say(msg: str) -> None:
        if rank_world()[0] == 0:
            print(msg, flush=True)

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
