"""Config -> task (model + frozen encoders) and data pipeline, through the model family's registry entry.

Each family's builders live with its task (`train/tasks/<family>.py: build_task / build_data`) and are named by
its `FamilySpec` (`task`, `data`); this file holds what every family shares."""

from __future__ import annotations

import torch

from mmkit.config import Config


def mm_checkpoint(path: str | None):
    """The `MMCheckpoint` (full state, config, HF side files) if `path` is an mmkit checkpoint (from
    `mmkit convert hf-to-mm` / `resplit`, pre-split or not, or a training run), else None (an HF folder).

    Example: `mm_checkpoint("ckpt/wan_tp2pp2")`.
    """
    from pathlib import Path

    p = Path(path) if path else None
    if p is None or not p.is_dir():
        return None
    marks = ("layout.json", "train_state.json", "latest")
    if not any((d / f).is_file() for d in (p, p.parent) for f in marks[:1]) and not any(
        (p / f).is_file() for f in marks[1:]
    ):
        return None
    from mmkit.checkpoint.mm import read_mm

    return read_mm(p)


def build_task(cfg: Config, device: torch.device):
    """The training task of `cfg.model.family`. Example: `task = build_task(cfg, torch.device("cpu"))`."""
    from mmkit import registry

    return registry.get(cfg.model.family).resolve("task")(cfg, device)


def build_data(cfg: Config, task, rank: int = 0, world_size: int = 1):
    """(dataset, resumable sampler, DataLoader) for the task's family.

    Example: `ds, sampler, loader = build_data(cfg, task, rank=0, world_size=1)`."""
    from mmkit import registry

    return registry.get(cfg.model.family).resolve("data")(cfg, task, rank, world_size)
