"""Frame quality against a reference video: MSE, PSNR and SSIM on frames in [0, 1].

Used by the cache searcher and `benchmarks/cache.py` to score a cached video against the uncached one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of two videos (T, H, W, 3) in [0, 1]."""
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def psnr(a: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB of `a` against `ref` (peak 1.0); inf for identical videos.

    Example: `psnr(cached_frames, uncached_frames)  # 31.2`.
    """
    m = mse(a, ref)
    return math.inf if m == 0 else 10 * math.log10(1.0 / m)


def ssim(a: np.ndarray, ref: np.ndarray, window: int = 7) -> float:
    """Mean SSIM over frames and channels (Gaussian window sigma 1.5, clipped to the frame size; the
    usual constants for peak 1.0). Videos (T, H, W, 3) in [0, 1].

    Example: `ssim(cached_frames, uncached_frames)  # 0.95`.
    """
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).permute(0, 3, 1, 2)  # (T, 3, H, W)
    y = torch.as_tensor(np.asarray(ref), dtype=torch.float64).permute(0, 3, 1, 2)
    w = min(window, x.shape[-1], x.shape[-2])
    g = torch.exp(-((torch.arange(w, dtype=torch.float64) - (w - 1) / 2) ** 2) / (2 * 1.5**2))
    k = (g[:, None] * g[None]) / g.sum() ** 2
    k = k.expand(x.shape[1], 1, w, w)

    def blur(z):
        return F.conv2d(z, k, groups=z.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
