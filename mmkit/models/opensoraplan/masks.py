"""OpenSoraPlan 1.3 i2v inpainting masks: the mask types, their pixel masks and the mask compressor.

A pixel mask is (T, 1, H, W) with 1 = frame to generate, 0 = frame given (the original `MaskProcessor`
convention); the masked video is `video * (mask < 0.5)`. `compress_mask` turns (B, 1, T, H, W) pixel
masks into the DiT's (B, stride_t, T', H/8, W/8) mask channels (the original `MaskCompressor`).
Pure tensor code: the VAE that encodes the masked video and the samplers live elsewhere.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

# the original `MaskType` names, in its order
MASK_TYPES = ("t2iv", "i2v", "transition", "continuation", "clear", "random_temporal")


def pixel_mask(
    mask_type: str,
    num_frames: int,
    height: int,
    width: int,
    *,
    min_clear_ratio: float = 0.0,
    max_clear_ratio: float = 1.0,
    rng: random.Random | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(T, 1, H, W) mask of one sample, 1 = to generate. `continuation` keeps a random first run of
    frames, `random_temporal` a random set (between min/max_clear_ratio of the frames), as the original.

    Example: `pixel_mask("i2v", 93, 352, 640)[:, 0, 0, 0]` -> `[0, 1, 1, ...]`.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask type {mask_type!r}: choose one of {', '.join(MASK_TYPES)}")
    rng = rng or random
    m = torch.ones(num_frames, 1, height, width, device=device, dtype=dtype)
    lo, hi = math.floor(num_frames * min_clear_ratio), math.ceil(num_frames * max_clear_ratio)
    if mask_type == "i2v":
        m[0] = 0
    elif mask_type == "transition":
        m[0] = 0
        m[-1] = 0
    elif mask_type == "continuation":
        m[: rng.randint(lo, hi)] = 0
    elif mask_type == "clear":
        m.zero_()
    elif mask_type == "random_temporal":
        m[rng.sample(range(num_frames), rng.randint(lo, hi))] = 0
    return m


def pick_mask_type(ratios: dict[str, float], rng: random.Random | None = None) -> str:
    """One mask type drawn with the given relative weights (the original `mask_type_ratio_dict`).

    Example: `pick_mask_type({"t2iv": 1, "i2v": 8, "transition": 8, "continuation": 2, "clear": 0,
    "random_temporal": 1})`.
    """
    bad = sorted(set(ratios) - set(MASK_TYPES))
    if bad or not ratios or sum(ratios.values()) <= 0 or min(ratios.values()) < 0:
        raise ValueError(
            f"data.mask_type_ratios={ratios!r}: keys must be among {', '.join(MASK_TYPES)} with "
            "non-negative weights, not all zero"
        )
    return (rng or random).choices(list(ratios), list(ratios.values()))[0]


def compress_mask(
    mask: torch.Tensor, stride_t: int = 4, stride_h: int = 8, stride_w: int = 8
) -> torch.Tensor:
    """Pixel masks (B, 1, T, H, W) -> the DiT's mask channels (B, stride_t, T', H/stride_h, W/stride_w).

    Bilinear resize of every frame, then the first frame repeated stride_t times (causal VAE: an odd
    T = 1 + 4n frames makes 1 + n latents) and each run of stride_t frames folded into the channels.
    Example: `compress_mask(torch.ones(1, 1, 93, 352, 640)).shape` -> `(1, 4, 24, 44, 80)`.
    """
    B, C, T, H, W = mask.shape
    if C != 1:
        raise ValueError(f"mask: expected (B, 1, T, H, W) pixel masks, got {tuple(mask.shape)}")
    h, w = H // stride_h, W // stride_w
    m = F.interpolate(mask.transpose(1, 2).reshape(B * T, 1, H, W), size=(h, w), mode="bilinear")
    m = m.view(B, T, h, w)
    if T % 2 == 1:
        m = torch.cat([m[:, :1].expand(B, stride_t, h, w), m[:, 1:]], dim=1)
    if m.shape[1] % stride_t:
        raise ValueError(
            f"mask: T={T} frames do not fold into latents of temporal stride {stride_t} (use 4k+1)"
        )
    return m.view(B, -1, stride_t, h, w).transpose(1, 2).contiguous()
