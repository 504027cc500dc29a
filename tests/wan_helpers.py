"""Shared helpers for Wan tests: a tiny, perturbed diffusers reference DiT; the training loss by hand."""

from __future__ import annotations

import torch


def tiny_dit_kwargs(i2v: bool = False, layers: int = 2) -> dict:
    # head_dim 24 -> RoPE split 8/8/8: all three axes are exercised
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=36 if i2v else 16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=40 if i2v else None,
        added_kv_proj_dim=48 if i2v else None,
        rope_max_seq_len=64,
    )


def perturbed_reference(i2v: bool = False, seed: int = 0, layers: int = 2):
    """diffusers WanTransformer3DModel with every parameter moved away from its init."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**tiny_dit_kwargs(i2v, layers)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def tiny_sampling_dit(layers: int) -> torch.nn.Module:
    """mmkit's WanTransformer at a size for whole sampling loops in tests (4 latent channels, 8 text tokens
    of width 16), every parameter perturbed (seed 0) so that no block is near the identity."""
    from mmkit.models.wan.config import WanConfig
    from mmkit.models.wan.model import WanTransformer

    torch.manual_seed(0)
    cfg = WanConfig(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=layers, text_len=8,
    )  # fmt: skip
    m = WanTransformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def hand_wan_loss(model, batch: dict, g: torch.Generator, cfg) -> tuple[float, list[tuple[float, bool]]]:
    """The summed Wan training loss of a precomputed-feature batch, written out sample by sample from the
    same per-sample generators the task uses (draw order: dropout, timestep, noise), for a `WanTaskConfig`.
    Returns (loss sum as float64, [(timestep, dropped)] per sample).

    Example: `want, draws = hand_wan_loss(dit, feats, torch.Generator().manual_seed(3), task.cfg)`.
    """
    from mmkit.train import losses as L
    from mmkit.train.tasks.wan import sample_generator

    abar = L.zero_snr_alphas_cumprod()  # checked against diffusers in tests/unit/train/test_losses.py
    n = batch["latents"].shape[0]
    epochs = batch.get("epoch", torch.zeros(n, dtype=torch.long)).tolist()
    index = batch.get("index", torch.arange(n)).tolist()
    total, draws = torch.zeros((), dtype=torch.float64), []
    for j, (e, i) in enumerate(zip(epochs, index)):
        gen = sample_generator(g, e, i)
        drop = bool(torch.rand((), generator=gen) < cfg.text_dropout)
        x0 = batch["latents"][j].float()  # (C, T, H, W)
        weight = 1.0
        if cfg.loss == "flow":
            u = torch.rand(1, generator=gen) if cfg.timestep_sampling == "uniform" else None
            u = torch.sigmoid(torch.randn(1, generator=gen)) if u is None else u  # logit-normal(0, 1)
            sigma = cfg.flow_shift * u / (1 + (cfg.flow_shift - 1) * u)
            eps = torch.randn(x0.shape, generator=gen)
            xt, target, timestep = (1 - sigma) * x0 + sigma * eps, eps - x0, sigma * 1000
        else:  # v-prediction, zero terminal SNR
            t = int(torch.randint(0, len(abar), (1,), generator=gen))
            eps = torch.randn(x0.shape, generator=gen)
            a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
            xt, target, timestep = a * x0 + s * eps, a * eps - s * x0, torch.tensor([float(t)])
            if cfg.min_snr_gamma:
                snr = float(abar[t] / (1 - abar[t]))
                weight = min(snr, cfg.min_snr_gamma) / (snr + 1)
        if "cond" in batch and batch["cond"] is not None:  # i2v: mask + first-frame latents after the noise
            xt = torch.cat([xt, batch["cond"][j].float()])
        ctx = batch["null_text_context" if drop else "text_context"][j]
        clip = batch["image_context"][j : j + 1] if batch.get("image_context") is not None else None
        pred = model(xt[None], timestep, ctx[None], clip)[0]
        total += weight * (pred.double() - target.double()).pow(2).sum()
        draws.append((float(timestep), drop))
    return float(total), draws
