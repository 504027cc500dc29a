"""Wan2.1 training task: a batch of videos + captions in, a diffusion loss out.

The task owns the frozen parts (umT5, VAE, CLIP for i2v; borrowed from the inference pipeline so
that training and sampling condition the DiT identically) and the trainable DiT. The trainer only
sees `task.model` (what it optimises, checkpoints and parallelises) and `task.loss(batch, g)`.

Objectives:
- "flow" (Wan2.1): x_t = (1 - sigma) x0 + sigma * eps, target eps - x0, sigma uniform or
  logit-normal then shifted; the DiT sees timestep 1000 * sigma.
- "v_pred_zero_snr" (OpenSoraPlan 1.3): DDPM with zero-terminal-SNR rescaled betas, integer
  timesteps, v-target, optional min-SNR-gamma weights.
i2v conditions on the first frame exactly as Wan does (4 mask channels + latents of the first
frame followed by zeros, concatenated to the noisy latents; CLIP tokens of the first frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmkit.common import LossOut
from mmkit.train import losses as L


@dataclass
class WanTaskConfig:
    task: str = "t2v"  # t2v | i2v
    loss: str = "flow"  # flow | v_pred_zero_snr
    timestep_sampling: str = "uniform"  # uniform | logit_normal (flow)
    flow_shift: float = 1.0  # training-time shift of sigma (flow)
    text_dropout: float = 0.1  # probability of replacing the caption with "" (classifier-free guidance)
    min_snr_gamma: float | None = None  # v_pred_zero_snr: min-SNR weighting, None = off


class WanTask:
    """Example:
    task = WanTask(dit, pipe, WanTaskConfig(task="t2v"))
    out = task.loss({"video": v, "caption": caps}, torch.Generator().manual_seed(0))
    (out.loss_sum / out.count).backward()
    """

    # the squared error every Wan training forward reduces to (here, under a parallel plan, in pipeline
    # stages): `loss_fn(pred, target, mask, weight, channel_dim) -> (sum, count)`
    loss_fn = staticmethod(L.mse_sum)

    def __init__(self, model, encoders, cfg: WanTaskConfig):
        if cfg.task not in ("t2v", "i2v"):
            raise ValueError(f"model.task={cfg.task!r}: Wan trains 't2v' or 'i2v'")
        if cfg.loss not in ("flow", "v_pred_zero_snr"):
            raise ValueError(f"train.loss={cfg.loss!r}: choose 'flow' or 'v_pred_zero_snr'")
        if not 0.0 <= cfg.text_dropout <= 1.0:
            raise ValueError(f"data.text_dropout={cfg.text_dropout}: must be in [0, 1]")
        self.model, self.enc, self.cfg = model, encoders, cfg
        self.alphas_cumprod = L.zero_snr_alphas_cumprod() if cfg.loss == "v_pred_zero_snr" else None

    # ---- frozen conditioning (no grad) -----------------------------------------------------
    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalized latents (B, C, T_lat, H_lat, W_lat), float32."""
        return self.enc.encode(video)

    @torch.no_grad()
    def encode_text(self, captions: list[str], drop: torch.Tensor) -> torch.Tensor:
        """umT5 features (B, 512, text_dim); captions where `drop` is True become the empty prompt."""
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return self.enc.encode_prompt(captions)

    @torch.no_grad()
    def image_condition(self, video: torch.Tensor, num_frames: int):
        """i2v: (mask + first-frame latents (B, 4 + C, T_lat, H_lat, W_lat), CLIP tokens (B, N, D))."""
        first = video[:, :, 0]  # (B, 3, H, W) in [-1, 1]
        cond = self.enc.condition_latents(first, first.shape[-2], first.shape[-1], num_frames)
        u8 = ((first.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        clip = self.enc.encode_image([Image.fromarray(np.ascontiguousarray(f)) for f in u8])
        return cond, clip

    def train_flops(self, samples: int, tokens: int) -> float:
        """Matmul FLOPs of forward + backward (3x forward) for `tokens` video tokens."""
        c = self.model.cfg
        d, f, L = c.dim, c.ffn_dim, c.num_layers
        s = tokens / max(samples, 1)  # tokens per sample (attention is quadratic per sample)
        text = c.text_len
        per_tok = L * (2 * 4 * d * d + 2 * 2 * d * d + 4 * d * f + 4 * s * d + 4 * text * d)
        per_sample_text = L * 2 * text * 2 * d * d
        return 3.0 * (tokens * per_tok + samples * per_sample_text)

    # ---- the loss --------------------------------------------------------------------------
    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        """Everything the DiT and the criterion need, without running the DiT: {"latents" (model input,
        noisy latents [+ i2v condition]), "timestep" (B,), "text_context", "image_context" or None,
        "target", "weight" or None}.

        `batch`: {"video": (B, 3, T, H, W) in [-1, 1], "caption": [str] * B} or precomputed features
        {"latents", "text_context", "null_text_context", "caption"[, "cond", "image_context"]}, plus
        optional "index"/"epoch" (B,) naming each sample visit. Every random draw (caption dropout, then
        the timestep, then the noise) comes from the sample's own generator, seeded from
        `generator.initial_seed()` and (epoch, index): a sample gets the same noise whichever process,
        micro-batch or parallel layout it lands in, so every layout reproduces the single-process loss.
        """
        B = len(batch["caption"])
        index = batch.get("index", torch.arange(B))
        epoch = batch.get("epoch", torch.zeros(B, dtype=torch.long))
        gens = [sample_generator(generator, int(e), int(i)) for e, i in zip(epoch.tolist(), index.tolist())]
        drop = torch.stack([torch.rand((), generator=g) for g in gens]) < self.cfg.text_dropout
        if "latents" in batch:  # precomputed features (mmkit.data.features)
            x0 = batch["latents"].float()
            ctx = torch.where(drop[:, None, None], batch["null_text_context"], batch["text_context"])
            cond, clip = batch.get("cond"), batch.get("image_context")
        else:
            video = batch["video"]
            x0 = self.encode_video(video)
            ctx = self.encode_text(list(batch["caption"]), drop)
            cond = clip = None
            if self.cfg.task == "i2v":
                cond, clip = self.image_condition(video, video.shape[2])
        dev = x0.device
        weight = None
        if self.cfg.loss == "flow":
            sigma = torch.cat(
                [L.sample_flow_sigmas(1, self.cfg.timestep_sampling, self.cfg.flow_shift, g) for g in gens]
            )
        else:
            t = torch.cat([torch.randint(0, len(self.alphas_cumprod), (1,), generator=g) for g in gens])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float32) for g in gens]).to(
            dev
        )
        if self.cfg.loss == "flow":
            xt, target = L.flow_noisy(x0, noise, sigma.to(dev))
            timestep = sigma.to(dev) * 1000
        else:
            xt, target = L.v_noisy(x0, noise, t.to(dev), self.alphas_cumprod)
            timestep = t.to(dev).float()
            if self.cfg.min_snr_gamma:
                weight = L.min_snr_v_weights(L.snr(t, self.alphas_cumprod), self.cfg.min_snr_gamma).to(dev)
        x_in = torch.cat([xt, cond], dim=1) if cond is not None else xt
        return {
            "latents": x_in,
            "timestep": timestep,
            "text_context": ctx,
            "image_context": clip,
            "target": target,
            "weight": weight,
        }

    def criterion(self, pred: torch.Tensor, prep: dict) -> LossOut:
        """Summed (weighted) squared error of the DiT output against the target, and its counters."""
        target = prep["target"]
        total, count = self.loss_fn(pred, target, weight=prep.get("weight"))
        B = target.shape[0]
        pt, ph, pw = self.model.cfg.patch_size
        tokens = B * (target.shape[2] // pt) * (target.shape[3] // ph) * (target.shape[4] // pw)
        return LossOut(total, count, B, tokens)

    def loss(self, batch: dict, generator: torch.Generator) -> LossOut:
        """`prepare`, the DiT, `criterion`. Randomness comes only from `generator` (see `prepare`), so a
        run is reproducible bit for bit."""
        prep = self.prepare(batch, generator)
        pred = self.model(prep["latents"], prep["timestep"], prep["text_context"], prep["image_context"])
        return self.criterion(pred, prep)


def sample_generator(generator: torch.Generator, epoch: int, index: int) -> torch.Generator:
    """The RNG of one sample visit: a pure function of the step generator's seed and (epoch, index).

    Example: `g = sample_generator(torch.Generator().manual_seed(7), epoch=0, index=12)`.
    """
    seed = (generator.initial_seed() * 1_000_003 + epoch) * 1_000_033 + index
    return torch.Generator().manual_seed(seed % (2**63))


# ---------------------------------------------------------------------------------------------------
# Builders named by the family spec (models/wan/spec.py)


def build_task(cfg, device: torch.device) -> WanTask:
    """The Wan task of `cfg` (`model.init_from`: a diffusers folder or an mmkit checkpoint of one).

    Example: `task = build_task(cfg, torch.device("cpu"))`."""
    from mmkit.infer.t2v import load_wan_pipeline
    from mmkit.train.build import mm_checkpoint

    if not cfg.model.init_from:
        raise ValueError(
            "model.init_from: Wan training needs a diffusers-layout folder for its frozen VAE and umT5 "
            "(and the DiT to start from); e.g. `mmkit create-tiny wan-t2v DIR` then --model.init_from DIR"
        )
    mm = mm_checkpoint(cfg.model.init_from)  # an mmkit checkpoint (converted, pre-split or trained)
    src = str(mm.source) if mm is not None else cfg.model.init_from
    pipe = load_wan_pipeline(src, task=cfg.model.task, device=str(device), dtype=cfg.model.dtype)
    dit = pipe.transformer
    if mm is not None:
        dit.load_state_dict(mm.state)
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


def build_data(cfg, task, rank: int = 0, world_size: int = 1):
    """(dataset, resumable sampler, DataLoader) of video clips, or of precomputed features
    (`data.precomputed_dir`). Example: `ds, sampler, loader = build_data(cfg, task)`."""
    from torch.utils.data import DataLoader

    from mmkit.data.video import ResumableSampler, VideoDataset, collate_videos

    if cfg.data.precomputed_dir:
        from mmkit.data.features import FeatureDataset, collate_features

        ds = FeatureDataset(cfg.data.precomputed_dir, cfg.data.max_samples)
        if ds.task != cfg.model.task:
            raise ValueError(
                f"data.precomputed_dir holds {ds.task} features but model.task={cfg.model.task!r}"
            )
        sampler = ResumableSampler(len(ds), seed=cfg.train.seed, rank=rank, world_size=world_size)
        loader = DataLoader(
            ds, batch_size=cfg.train.micro_batch, sampler=sampler, collate_fn=collate_features,
            num_workers=cfg.data.num_workers,
        )  # fmt: skip
        return ds, sampler, loader
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
    sampler = ResumableSampler(len(ds), seed=cfg.train.seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        ds,
        batch_size=cfg.train.micro_batch,
        sampler=sampler,
        collate_fn=collate_videos,
        num_workers=cfg.data.num_workers,
    )
    return ds, sampler, loader
