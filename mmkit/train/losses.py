"""Training objectives: rectified-flow matching, v-prediction with zero-terminal-SNR, next-token CE.

Each loss returns a `(sum, count)` pair instead of a mean: the trainer adds sums and counts over
all micro-batches (and data-parallel ranks) of one optimizer step and divides once, so the loss
and its gradient do not depend on how the global batch is split (micro-batches, processes,
packing). Nothing here knows about models: callers pass predictions and targets. The single-device
tasks, the parallel plans and the pipeline stages all reduce to these functions (plans get them from
the task, `task.loss_fn`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmkit.common import IGNORE_INDEX

# ---------------------------------------------------------------------------------------------
# Rectified flow (Wan2.1): x_t = (1 - sigma) * x0 + sigma * noise, target v = noise - x0.


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution time shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_flow_sigmas(
    batch: int,
    method: str = "uniform",
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Per-sample noise levels in (0, 1), float32 (B,): uniform or logit-normal, then shifted.

    Example: `sigma = sample_flow_sigmas(4, "logit_normal", shift=3.0, generator=g)`.
    """
    if method == "uniform":
        u = torch.rand(batch, generator=generator)
    elif method == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)
    else:
        raise ValueError(f"train.timestep_sampling={method!r}: choose 'uniform' or 'logit_normal'")
    return shift_sigma(u, shift).float()


def flow_noisy(
    x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for rectified flow; sigma (B,) broadcast over (B, C, T, H, W)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def mse_sum(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    weight=None,
    channel_dim: int = 1,
):
    """Sum of squared errors (float32) and the element count it averages over.

    `mask` (B, T, H, W) is broadcast over channels (`channel_dim`, 1 for videos (B, C, T, H, W); -1 for
    tokens (B, S, P) with a mask (B, S) or (S,)); a mask of `pred`'s own shape masks element by element.
    `weight` (B,) scales each sample.
    Example: `total, count = mse_sum(pred, target, weight=min_snr_weights)`.
    """
    err = (pred.float() - target.float()).pow(2)  # (B, C, T, H, W)
    if weight is not None:
        err = err * weight.float().view(-1, *([1] * (err.ndim - 1)))
    if mask is None:
        return err.sum(), err.numel()
    if mask.shape == err.shape:
        m = mask.float()
        return (err * m).sum(), m.sum()
    m = mask.float().unsqueeze(channel_dim)  # (B, 1, T, H, W)
    return (err * m).sum(), m.sum() * err.shape[channel_dim]


# ---------------------------------------------------------------------------------------------
# DDPM v-prediction with zero terminal SNR (Lin et al. 2024), as OpenSoraPlan 1.3 trains.


def zero_snr_alphas_cumprod(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, schedule: str = "linear"
) -> torch.Tensor:
    """alphas_cumprod (num_timesteps,) float32 with the last entry exactly 0 (SNR(T) = 0).

    Betas are linear (or "scaled_linear": linear in sqrt) from beta_start to beta_end; then
    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first is unchanged.
    """
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"beta schedule {schedule!r}: choose 'linear' or 'scaled_linear'")
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    # betas from the rescaled curve, then cumprod again, exactly as the schedulers recompute them
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return torch.cumprod(1.0 - (1.0 - alphas), dim=0)


def v_noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor):
    """(x_t, v-target) at integer timesteps t (B,): x_t = a x0 + s noise, v = a noise - s x0."""
    ac = alphas_cumprod.to(x0.device)[t].to(x0.dtype)
    shape = (-1, *([1] * (x0.ndim - 1)))
    a, s = ac.sqrt().view(shape), (1 - ac).sqrt().view(shape)
    return a * x0 + s * noise, a * noise - s * x0


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) at timesteps t."""
    ac = alphas_cumprod.to(t.device)[t]
    return ac / (1 - ac)


def min_snr_v_weights(snr_t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma weights for v-prediction: min(snr, gamma) / (snr + 1) (finite at snr = 0)."""
    return torch.clamp(snr_t, max=gamma) / (snr_t + 1)


# ---------------------------------------------------------------------------------------------
# Next-token cross-entropy on assistant tokens (VLM SFT).


def supervised_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head) -> tuple[torch.Tensor, int]:
    """Sum of CE over the positions whose target is not IGNORE_INDEX, and their count; the LM head
    runs at those positions only (at a 150k vocabulary it is the largest matmul of a short answer).

    hidden (..., D) and targets (...) are aligned (position i's target is the token after it); `head`
    maps (K, D) -> logits (K, vocab) (the LM head module, or a function of its weight).
    Example: `total, n = supervised_ce_sum(hidden[:, :-1], labels[:, 1:], model.language.lm_head)`.
    """
    keep = targets != IGNORE_INDEX
    logits = head(hidden[keep])  # (K, vocab)
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


def next_token_ce_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Sum of next-token CE over positions whose *next* label is not ignored, and their count.

    logits (B, S, V) are predictions for positions 0..S-1; labels (B, S) are the token ids at the
    same positions (-100 = no loss). Position i predicts labels[i + 1]. Packed rows work unchanged
    as long as each sample's first label is -100 (its first token is never a target).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return total, int((shift_labels != ignore_index).sum())


def logit_normal_pdf(sigma: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution (for plots/tests of the timestep sampler)."""
    logit = torch.log(sigma / (1 - sigma))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (
        std * math.sqrt(2 * math.pi) * sigma * (1 - sigma)
    )
