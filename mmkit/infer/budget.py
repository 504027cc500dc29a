"""Memory budget of an inference job, checked before any weights load.

A job adds up what it will hold (weights, latents, activations, KV cache, decoded frames) as a dict of
named byte counts; `check_memory` compares the sum with what the device has free: beyond it the job is
refused, beyond `WARN_FRACTION` of it a warning gives the number. The numbers are estimates of the
peak (what a job would allocate at once), good to a factor of about 1.5, enough to stop a request that
can never fit before it grows for minutes.

Example:
    >>> need = {"weights": 2.8e9, "kv cache": kv_cache_bytes(28, 4, 128, 4096, 2)}
    >>> check_memory(need, torch.device("cpu"), "chat")
"""

from __future__ import annotations

import math
import os
import warnings

import torch

WARN_FRACTION = 0.8  # warn when an estimate takes more than this share of the free memory


def device_memory(device: torch.device) -> int | None:
    """Bytes free for a new job on `device` (CPU: MemAvailable), None where it cannot be asked."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "npu" and hasattr(torch, "npu"):
        free, _total = torch.npu.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024  # kB
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def gib(n: float) -> str:
    """Bytes as GiB text. Example: `gib(3 * 2**30)` -> `"3.0 GiB"`."""
    return f"{n / 2**30:.1f} GiB"


def check_memory(parts: dict[str, float], device: torch.device, what: str, fix: str = "") -> int:
    """Refuse (ValueError) a job whose estimated peak exceeds `device`'s free memory, warn past
    `WARN_FRACTION` of it; returns the estimate in bytes. `parts` names what the bytes are for.

    Example: `check_memory({"latents": 4e9, "VAE decode": 9e9}, torch.device("cuda"), "generate")`.
    """
    need = int(sum(parts.values()))
    have = device_memory(device)
    detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v >= 2**20)
    if have is not None and need > have:
        raise ValueError(
            f"{what} needs about {gib(need)} ({detail}), but {device} has {gib(have)} free"
            + (f"; {fix}" if fix else "")
        )
    if have is not None and need > WARN_FRACTION * have:
        warnings.warn(
            f"{what} needs about {gib(need)} ({detail}) of the {gib(have)} free on {device}", stacklevel=2
        )
    return need


def kv_cache_bytes(
    layers: int, kv_heads: int, head_dim: int, tokens: int, dtype_bytes: int, batch: int = 1
) -> int:
    """Bytes of a preallocated KV cache (keys and values). Example: `kv_cache_bytes(28, 4, 128, 4096, 2)`."""
    return 2 * layers * batch * kv_heads * tokens * head_dim * dtype_bytes


def tensor_bytes(shape, dtype_bytes: int) -> int:
    """Bytes of a tensor of `shape`. Example: `tensor_bytes((1, 16, 21, 60, 104), 4)`."""
    return math.prod(shape) * dtype_bytes
