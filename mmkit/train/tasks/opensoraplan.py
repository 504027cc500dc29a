"""OpenSoraPlan 1.3 training task: latents + mT5 captions in, the v-prediction zero-terminal-SNR loss out.

As the original v1.3.1 trainer (`train_t2v_diffusers.py`, `train_inpaint.py`):
- DDPM over 1000 steps, linear betas 1e-4..0.02 rescaled to zero terminal SNR; x_t = add_noise(x0, eps, t),
  target v = get_velocity(x0, eps, t);
- integer timesteps drawn by "explicit uniform sampling": [0, 1000) cut into n equal strata, stratum r
  for data-parallel rank r. mmkit keys the stratum on the sample's position in the epoch order (mod n,
  n = `train.timestep_strata`): the sampler gives position p to dp rank p mod dp, so with n = dp each
  rank draws from its own stratum as in the original, and every layout sees the same timesteps;
- loss weights min(SNR, 5) / (SNR + 1), the squared error masked over real latents (`video_mask`) and
  divided by the mask sum times channels (`losses.mse_sum`);
- caption dropout: with probability `data.text_dropout` the caption is the empty prompt, with the
  empty prompt's own mT5 features and attention mask (the original replaces the text by "");
- i2v: a mask type per sample, drawn with `data.mask_type_ratios`; the DiT input is
  [noisy latents | masked-video latents | compressed mask] (`models/opensoraplan/masks.py`).

Batches are precomputed features (`data.precomputed_dir`: `latents`, `text_context` + `text_mask`,
`null_text_context` + `null_text_mask`) or raw videos + captions encoded by the family's pipeline (its
WF-VAE and mT5). The i2v DiT input needs the WF-VAE latents of the masked video, which the causal VAE
mixes across frames (no latent-space stand-in is exact), so i2v features hold them, encoded at extraction
(`feature_extras`): `masked_<type>` (K, C, T', H', W') and the pixel frames to generate `gen_<type>`
(K, T) for every mask type with a non-zero ratio; K = 1 for the fixed types (t2iv, i2v, transition,
clear) and `data.mask_draws` for the random ones (continuation, random_temporal), each draw j seeded by
(sample index, type, j). Training on features picks the type as on raw videos, then one of the K draws;
raw videos with the same `data.mask_draws` pick the same draw and encode the same masked video, so both
give the same batches (`mask_draws` 0: raw videos draw a fresh mask at every visit).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmkit.common import LossOut
from mmkit.models.opensoraplan.masks import MASK_TYPES, compress_mask, pick_mask_type, pixel_mask
from mmkit.train import losses as L
from mmkit.train.tasks.wan import sample_generator

NUM_TIMESTEPS = 1000
# the release's i2v mask-type weights for videos (Open-Sora-Plan v1.3.1 scripts/train_configs/mask_config.yaml)
DEFAULT_MASK_RATIOS = {
    "t2iv": 1,
    "i2v": 8,
    "transition": 8,
    "continuation": 2,
    "clear": 0,
    "random_temporal": 1,
}


@dataclass
class OSPTaskConfig:
    task: str = "t2v"  # t2v | i2v
    text_dropout: float = 0.1  # probability of the empty prompt (the original `--cfg 0.1`)
    min_snr_gamma: float | None = 5.0  # min(SNR, gamma) / (SNR + 1) weights; None = unweighted
    timestep_strata: int = 1  # explicit uniform sampling: strata of [0, 1000) (the original's dp size)
    mask_type_ratios: dict = field(default_factory=lambda: dict(DEFAULT_MASK_RATIOS))
    min_clear_ratio: float = 0.0  # continuation / random_temporal: share of frames given, lower bound
    max_clear_ratio: float = 1.0
    mask_draws: int = 0  # fixed draws per sample of the random mask types (0: fresh at every visit)


DRAWN_TYPES = ("continuation", "random_temporal")  # the mask types whose frames are drawn at random


def mask_rng(index: int, mask_type: str, draw: int) -> random.Random:
    """The generator of fixed mask draw `draw` of sample `index` (the same at extraction and in training).

    Example: `pixel_mask("continuation", 93, 1, 1, rng=mask_rng(7, "continuation", 0))`.
    """
    return random.Random(f"opensoraplan-mask:{index}:{mask_type}:{draw}")


def stratified_timestep(stratum: int, strata: int, u: float) -> int:
    """The original `explicit_uniform_sampling` for one sample: round(uniform(lo, hi)) over stratum r of n
    equal strata of [0, 1000), lo = 1000 r / n - 0.5; `u` in [0, 1). Clamped to 999 (round(999.5) = 1000).

    Example: `stratified_timestep(1, 4, 0.5)` -> `375`.
    """
    size = NUM_TIMESTEPS / strata
    lo = size * stratum - 0.5
    return min(NUM_TIMESTEPS - 1, max(0, round(lo + u * size)))


class OpenSoraPlanTask:
    """Example:
    task = OpenSoraPlanTask(dit, None, OSPTaskConfig(task="t2v"))
    out = task.loss(feature_batch, torch.Generator().manual_seed(0))
    (out.loss_sum / out.count).backward()
    """

    # the squared error every OSP training forward reduces to (here, under a plan, in pipeline stages)
    loss_fn = staticmethod(L.mse_sum)

    def __init__(self, model, encoders, cfg: OSPTaskConfig):
        if cfg.task not in ("t2v", "i2v"):
            raise ValueError(f"model.task={cfg.task!r}: OpenSoraPlan trains 't2v' or 'i2v'")
        if (cfg.task == "i2v") != model.cfg.i2v:
            raise ValueError(
                f"model.task={cfg.task!r} but model.init_from holds a {'i2v' if model.cfg.i2v else 't2v'} "
                "OpenSoraPlan DiT (config.json _class_name); use the matching task or folder"
            )
        if not 0.0 <= cfg.text_dropout <= 1.0:
            raise ValueError(f"data.text_dropout={cfg.text_dropout}: must be in [0, 1]")
        if cfg.timestep_strata < 1:
            raise ValueError(f"train.timestep_strata={cfg.timestep_strata}: must be >= 1")
        if cfg.mask_draws < 0:
            raise ValueError(f"data.mask_draws={cfg.mask_draws}: must be >= 0 (0 = a fresh draw per visit)")
        if cfg.task == "i2v":
            pick_mask_type(cfg.mask_type_ratios)  # validates the ratios before any compute
        self.model, self.enc, self.cfg = model, encoders, cfg
        self.alphas_cumprod = L.zero_snr_alphas_cumprod(NUM_TIMESTEPS)
        self.sample_order = None  # fn(epoch) -> dataset indices in epoch order (set by build_data)
        self._positions: dict[int, np.ndarray] = {}

    def position(self, epoch: int, index: int) -> int:
        """The sample's position in its epoch's global order (0 when no order is known)."""
        if self.sample_order is None:
            return 0
        if epoch not in self._positions:
            order = np.asarray(self.sample_order(epoch))
            inv = np.empty_like(order)
            inv[order] = np.arange(len(order))
            self._positions = {epoch: inv}
        return int(self._positions[epoch][index])

    def train_flops(self, samples: int, tokens: int) -> float:
        """Matmul FLOPs of forward + backward (3x forward) for `tokens` video tokens (dense attention
        counted on the 4 dense layers, 1/k of it on the Skiparse ones)."""
        c = self.model.cfg
        d, n = c.hidden, c.num_layers
        s = tokens / max(samples, 1)
        attn = sum(1.0 if c.skiparse(i) is None else 1.0 / c.sparse_n for i in range(n))
        per_tok = (
            n * (2 * 4 * d * d + 2 * 2 * d * d + 2 * 2 * 4 * d * d + 4 * c.text_len * d) + attn * 4 * s * d
        )
        return 3.0 * (tokens * per_tok + samples * n * 2 * c.text_len * 2 * d * d)

    # ---- frozen encoders (raw videos; `mmkit data features` writes their outputs once) -----------
    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> scaled WF-VAE latents (B, 8, T', H/8, W/8), float32."""
        return self.enc.encode(video).float()

    @torch.no_grad()
    def encode_text(self, captions: list[str], drop: torch.Tensor) -> torch.Tensor:
        """mT5 features (B, 512, 4096); captions where `drop` is True become the empty prompt."""
        return self.enc.encode_prompt(["" if d else c for c, d in zip(captions, drop.tolist())])[0]

    def text_length(self, caption: str) -> int:
        """Real tokens of a caption (its mT5 attention mask), at most the model's text length."""
        tok = self.enc.text_encoder.tokenizer(caption, add_special_tokens=True)
        return min(len(tok.input_ids), self.model.cfg.text_len)

    # ---- conditioning ----------------------------------------------------------------------
    def _mask(self, kind: str, frames: int, h: int, w: int, rng: random.Random) -> torch.Tensor:
        """(T, 1, h, w) pixel mask of one sample, 1 = generate."""
        c = self.cfg
        return pixel_mask(kind, frames, h, w, min_clear_ratio=c.min_clear_ratio, max_clear_ratio=c.max_clear_ratio,
                          rng=rng)  # fmt: skip

    @torch.no_grad()
    def feature_extras(self, video: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """i2v features of one clip (1, 3, T, H, W) that will be sample `index`: for every mask type with a
        non-zero ratio, `masked_<type>` (K, C, T', H', W') WF-VAE latents of the masked video and
        `gen_<type>` (K, T) its frames to generate (K = `mask_draws` draws for the random types, else 1).
        t2v: nothing. Example: `extra = task.feature_extras(video, 0)`.
        """
        if self.cfg.task != "i2v":
            return {}
        out = {}
        for kind, ratio in self.cfg.mask_type_ratios.items():
            if ratio <= 0:
                continue
            draws = max(1, self.cfg.mask_draws) if kind in DRAWN_TYPES else 1
            lat, gen = [], []
            for j in range(draws):
                m = self._mask(kind, video.shape[2], 1, 1, mask_rng(index, kind, j))  # (T, 1, 1, 1)
                lat.append(self.enc.encode(video * (m.transpose(0, 1)[None] < 0.5).to(video)).float()[0])
                gen.append(m[:, 0, 0, 0])
            out[f"masked_{kind}"], out[f"gen_{kind}"] = torch.stack(lat), torch.stack(gen)
        return out

    def _i2v_condition(self, x0: torch.Tensor, video, gens, keys, batch: dict) -> torch.Tensor:
        """(B, C + C + stride_t, T', H', W'): masked-video latents and the compressed mask."""
        c = self.cfg
        B, _, T_lat, H_lat, W_lat = x0.shape
        st = self.model.cfg.vae_scale_factor_t
        frames = (T_lat - 1) * st + 1 if video is None else video.shape[2]
        masks, stored = [], []
        for b, (g, (_, index)) in enumerate(zip(gens, keys)):
            rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))
            kind = pick_mask_type(c.mask_type_ratios, rng)
            if video is None:  # features: one of the masked videos encoded at extraction
                if f"masked_{kind}" not in batch:
                    raise ValueError(
                        f"data.precomputed_dir: the features hold no masked-video latents for mask type {kind!r} "
                        f"(data.mask_type_ratios gives it weight {c.mask_type_ratios[kind]}); extract them again "
                        "with `mmkit data features` and these ratios (model.task = 'i2v')"
                    )
                j = rng.randrange(batch[f"masked_{kind}"].shape[1])
                stored.append(batch[f"masked_{kind}"][b, j])
                m = batch[f"gen_{kind}"][b, j].float().view(-1, 1, 1, 1)  # (T, 1, 1, 1)
            else:
                mrng = rng
                if c.mask_draws and kind in DRAWN_TYPES:  # the fixed draws features hold
                    mrng = mask_rng(index, kind, rng.randrange(c.mask_draws))
                m = self._mask(kind, frames, *video.shape[-2:], mrng)
            masks.append(m.transpose(0, 1))  # (1, T, h, w)
        pm = torch.stack(masks).to(x0.device)  # (B, 1, T, h, w), 1 = generate
        if video is None:
            # the mask is per frame: a 1x1 pixel mask resizes as the full-size one of a raw video does
            lat_mask = compress_mask(pm, st, 1, 1).expand(B, st, T_lat, H_lat, W_lat)
            masked = torch.stack(stored).to(x0)
        else:
            lat_mask = compress_mask(
                pm.to(video.dtype), st, video.shape[-2] // H_lat, video.shape[-1] // W_lat
            )
            with torch.no_grad():
                masked = self.enc.encode(video * (pm < 0.5)).float()
        return torch.cat([masked, lat_mask.to(x0.dtype)], dim=1)

    # ---- the loss --------------------------------------------------------------------------
    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        """Everything the DiT and the criterion need, without running the DiT: {"latents" (model input),
        "timestep" (B,), "text_context" (B, L, 4096), "text_mask" (B, L), "video_mask" (B, T, H, W) or
        None, "target", "weight" (B,) or None}.

        Every random draw (caption dropout, then the timestep, then the noise, then the i2v mask) comes from
        the sample's own generator, keyed on `generator.initial_seed()` and the sample visit (epoch, index),
        so every parallel layout reproduces the single-process loss.
        """
        B = len(batch["caption"])
        index = batch.get("index", torch.arange(B))
        epoch = batch.get("epoch", torch.zeros(B, dtype=torch.long))
        keys = list(zip(epoch.tolist(), index.tolist()))
        gens = [sample_generator(generator, e, i) for e, i in keys]
        drop = torch.stack([torch.rand((), generator=g) for g in gens]) < self.cfg.text_dropout
        video = None
        if "latents" in batch:  # precomputed features (mmkit.data.features)
            x0 = batch["latents"].float()
            ctx = torch.where(drop[:, None, None], batch["null_text_context"], batch["text_context"])
            tmask = torch.where(drop[:, None], batch["null_text_mask"], batch["text_mask"])
        else:
            if self.enc is None:
                raise ValueError(
                    "data: raw videos need the WF-VAE and mT5; set data.precomputed_dir or model.init_from"
                )
            video = batch["video"]
            with torch.no_grad():
                x0 = self.enc.encode(video).float()
                captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
                ctx, tmask = self.enc.encode_prompt(captions)
        dev = x0.device
        n = self.cfg.timestep_strata
        t = torch.tensor(
            [stratified_timestep(self.position(e, i) % n, n, torch.rand((), generator=g).item())
             for (e, i), g in zip(keys, gens)]
        )  # fmt: skip
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float32) for g in gens]).to(
            dev
        )
        xt, target = L.v_noisy(x0, noise, t.to(dev), self.alphas_cumprod)
        weight = None
        if self.cfg.min_snr_gamma:
            weight = L.min_snr_v_weights(L.snr(t, self.alphas_cumprod), self.cfg.min_snr_gamma).to(dev)
        if self.cfg.task == "i2v":
            x_in = torch.cat([xt, self._i2v_condition(x0, video, gens, keys, batch)], dim=1)
        else:
            x_in = xt
        return {
            "latents": x_in,
            "timestep": t.to(dev),
            "text_context": ctx,
            "text_mask": tmask,
            "video_mask": None if batch.get("video_mask") is None else batch["video_mask"].to(dev),
            "target": target,
            "weight": weight,
        }

    def criterion(self, pred: torch.Tensor, prep: dict) -> LossOut:
        """Summed weighted squared error over real latents, and its counters."""
        target, vmask = prep["target"], prep.get("video_mask")
        total, count = self.loss_fn(pred, target, vmask, prep.get("weight"))
        B, p = target.shape[0], self.model.cfg.patch_size
        tokens = B * target.shape[2] * (target.shape[3] // p) * (target.shape[4] // p)
        return LossOut(total, count, B, tokens)

    def loss(self, batch: dict, generator: torch.Generator) -> LossOut:
        """`prepare`, the DiT, `criterion`."""
        prep = self.prepare(batch, generator)
        pred = self.model(
            prep["latents"], prep["timestep"], prep["text_context"],
            video_mask=prep["video_mask"], caption_mask=prep["text_mask"],
        )  # fmt: skip
        return self.criterion(pred.float(), prep)


# ---------------------------------------------------------------------------------------------------
# Builders named by the family spec (models/opensoraplan/spec.py)


def _task_config(cfg) -> OSPTaskConfig:
    d, t = cfg.data, cfg.train
    if t.loss != "v_pred_zero_snr":
        raise ValueError(f"train.loss={t.loss!r}: OpenSoraPlan 1.3 trains with 'v_pred_zero_snr'")
    return OSPTaskConfig(
        task=cfg.model.task,
        text_dropout=d.text_dropout,
        min_snr_gamma=t.snr_gamma or None,
        timestep_strata=t.timestep_strata,
        mask_type_ratios=dict(zip(MASK_TYPES, d.mask_type_ratios))
        if d.mask_type_ratios
        else dict(DEFAULT_MASK_RATIOS),
        mask_draws=d.mask_draws,
    )


def build_task(cfg, device: torch.device) -> OpenSoraPlanTask:
    """The OpenSoraPlan task of `cfg`: the DiT from `model.init_from` (a release folder, a pipeline folder
    or an mmkit checkpoint of one) or, without it, a random `model.flavor`; the frozen WF-VAE and mT5 from
    the family's pipeline when training on raw videos. Example: `task = build_task(cfg, torch.device("cpu"))`."""
    from mmkit import registry
    from mmkit.train.build import mm_checkpoint

    spec = registry.get("opensoraplan")
    tcfg = _task_config(cfg)
    src = cfg.model.init_from
    mm = mm_checkpoint(src)  # an mmkit checkpoint (converted, pre-split or trained), else None
    if mm is not None:
        src = str(mm.source) if mm.source else None
    enc = model = None
    if not cfg.data.precomputed_dir:  # raw videos: the pipeline's WF-VAE and mT5 encode them
        if not src:
            raise ValueError(
                "model.init_from: training on raw videos needs an OpenSoraPlan pipeline folder (WF-VAE + mT5); "
                "set model.init_from, or train on features with data.precomputed_dir"
            )
        enc = spec.resolve("pipeline")(src, task=cfg.model.task, device=str(device), dtype=cfg.model.dtype)
        for part in (getattr(enc, "vae", None), getattr(enc, "text_encoder", None)):
            if part is not None:
                part.requires_grad_(False).eval()
        model = enc.transformer  # the pipeline's DiT is the one trained (no second copy)
    state = mm.state if mm is not None else None
    if model is None:
        if mm is not None:
            model_cfg = mm.model_cfg
        elif src:
            m = spec.resolve("hf").read(Path(src))
            model_cfg, state = m.cfg, m.state
        else:
            model_cfg = spec.flavor(cfg.model.flavor)
        model = spec.build_model(model_cfg).to(device)
    if state is not None:
        model.load_state_dict(state)
    model.float().train()  # trainable weights are the fp32 master copy
    for p in model.parameters():
        p.requires_grad_(True)
    return OpenSoraPlanTask(model, enc, tcfg)


def build_data(cfg, task, rank: int = 0, world_size: int = 1):
    """(dataset, resumable sampler, DataLoader) of precomputed features (`data.precomputed_dir`) or video
    clips. Example: `ds, sampler, loader = build_data(cfg, task)`."""
    import functools

    from torch.utils.data import DataLoader

    from mmkit.data.features import collate_features
    from mmkit.train.tasks.wan import build_data as wan_build_data

    ds, sampler, loader = wan_build_data(cfg, task, rank, world_size)
    if cfg.data.precomputed_dir:  # clips of different sizes batch together, padded and masked
        loader = DataLoader(
            ds, batch_size=cfg.train.micro_batch, sampler=sampler, num_workers=cfg.data.num_workers,
            collate_fn=functools.partial(collate_features, pad=True),
        )  # fmt: skip
    task.sample_order = sampler.order  # the epoch order: timestep strata follow sample positions
    return ds, sampler, loader
