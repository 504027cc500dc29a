"""Config -> task (model + frozen encoders) and data pipeline. One function per family."""

from __future__ import annotations

import torch

from mmkit.config import Config


def build_task(cfg: Config, device: torch.device):
    """The training task of `cfg.model.family`. Example: `task = build_task(cfg, torch.device("cpu"))`."""
    if cfg.model.family == "wan":
        return _wan_task(cfg, device)
    raise ValueError(
        f"model.family={cfg.model.family!r}: the trainer supports 'wan' so far "
        "(Qwen2.5-VL SFT training is not wired into the trainer yet)"
    )


def _wan_task(cfg: Config, device: torch.device):
    from mmkit.infer.pipelines import load_pipeline
    from mmkit.train.tasks.wan import WanTask, WanTaskConfig

    if not cfg.model.init_from:
        raise ValueError(
            "model.init_from: Wan training needs a diffusers-layout folder for its frozen VAE and umT5 "
            "(and the DiT to start from); e.g. `mmkit create-tiny wan-t2v DIR` then --model.init_from DIR"
        )
    pipe = load_pipeline(cfg.model.init_from, task=cfg.model.task, device=str(device), dtype=cfg.model.dtype)
    dit = pipe.transformer
    dit.to_dtype(torch.float32)  # trainable weights are the fp32 master copy
    for p in dit.parameters():
        p.requires_grad_(True)
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "image_encoder", None)):
        if m is not None:
            m.requires_grad_(False).eval()
    tcfg = WanTaskConfig(
        task=cfg.model.task,
        loss=cfg.train.loss,
        timestep_sampling=cfg.train.timestep_sampling,
        flow_shift=cfg.train.flow_shift,
        text_dropout=cfg.data.text_dropout,
    )
    return WanTask(dit, pipe, tcfg)


def build_data(cfg: Config, task):
    """(dataset, resumable sampler, DataLoader) for the task's family."""
    from torch.utils.data import DataLoader

    from mmkit.data.video import ResumableSampler, VideoDataset, collate_videos

    if cfg.model.family != "wan":
        raise ValueError(f"model.family={cfg.model.family!r}: no data pipeline yet")
    ds = VideoDataset(
        cfg.data.paths,
        num_frames=cfg.data.num_frames,
        height=cfg.data.height,
        width=cfg.data.width,
        train_fps=cfg.data.train_fps,
        max_samples=cfg.data.max_samples,
        seed=cfg.train.seed,
        progress=False,
    )
    sampler = ResumableSampler(len(ds), seed=cfg.train.seed)
    loader = DataLoader(
        ds,
        batch_size=cfg.train.micro_batch,
        sampler=sampler,
        collate_fn=collate_videos,
        num_workers=cfg.data.num_workers,
    )
    return ds, sampler, loader
