"""Step caches installed from outside the model: DiTCache, AttentionCache, the adaptive cache, the CFG cache.

Example:
    >>> from mmkit.infer.accel.cache import DiTCacheConfig, apply_cache, cache_stats, remove_cache
    >>> apply_cache(pipe.transformer, DiTCacheConfig(20, 2, 47, 10, 30))
    >>> video = pipe("a red circle moves left", num_inference_steps=50)
    >>> print(cache_stats(pipe.transformer).summary())  # "650/3000 DiT block evaluations skipped ..."
    >>> remove_cache(pipe.transformer)  # the model is as it was
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mmkit.infer.accel.cache.adaptive import AdaptiveCacheConfig, apply_adaptive_cache
from mmkit.infer.accel.cache.attention import AttentionCacheConfig, apply_attention_cache
from mmkit.infer.accel.cache.cfg import CFGCacheConfig, apply_cfg_cache
from mmkit.infer.accel.cache.common import COUNTER, SkipStats
from mmkit.infer.accel.cache.dit import DiTCacheConfig, apply_dit_cache
from mmkit.infer.accel.hooks import HookRegistry, unregister

METHODS = {
    "dit": (DiTCacheConfig, apply_dit_cache),
    "attention": (AttentionCacheConfig, apply_attention_cache),
    "adaptive": (AdaptiveCacheConfig, apply_adaptive_cache),
    "cfg": (CFGCacheConfig, apply_cfg_cache),
}
CacheConfig = DiTCacheConfig | AttentionCacheConfig | AdaptiveCacheConfig | CFGCacheConfig

__all__ = [
    "AdaptiveCacheConfig",
    "AttentionCacheConfig",
    "CFGCacheConfig",
    "DiTCacheConfig",
    "apply_cache",
    "cache_config_from_dict",
    "cache_stats",
    "load_cache_config",
    "remove_cache",
]


def apply_cache(transformer: nn.Module, *configs: CacheConfig) -> None:
    """Install one or more caches (a block cache, then optionally a `CFGCacheConfig`).

    Example: `apply_cache(pipe.transformer, AdaptiveCacheConfig(0.08), CFGCacheConfig(10, 2, 45))`.
    """
    block_caches = [c for c in configs if not isinstance(c, CFGCacheConfig)]
    if len(block_caches) > 1:
        raise ValueError(f"apply_cache: one block cache at a time (got {[c.method for c in block_caches]})")
    for cfg in sorted(configs, key=lambda c: isinstance(c, CFGCacheConfig)):  # block cache first
        METHODS[cfg.method][1](transformer, cfg)


def remove_cache(transformer: nn.Module) -> None:
    """Remove every cache hook from `transformer` and its submodules; the model is as before.

    Example: `remove_cache(pipe.transformer)`.
    """
    for m in transformer.modules():
        reg = HookRegistry.get(m)
        for name in [n for n in (reg.hooks if reg else ()) if n.startswith("mmkit_cache_") or n == COUNTER]:
            unregister(m, name)


def cache_stats(transformer: nn.Module) -> SkipStats:
    """Skip counts of the last generation (all branches). Example: `cache_stats(t).skipped_fraction`."""
    reg = HookRegistry.get(transformer)
    hook = reg.get_hook(COUNTER) if reg is not None else None
    return hook.stats if hook is not None else SkipStats()


def cache_config_from_dict(d: dict, where: str = "cache config") -> CacheConfig:
    """`{"method": "dit", "step_start": 20, ...}` -> the config dataclass, with errors naming the key.

    Example: `cache_config_from_dict({"method": "adaptive", "threshold": 0.08})`.
    """
    d = dict(d)
    method = d.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"{where}: method={method!r}; choose one of {list(METHODS)}")
    cls = METHODS[method][0]
    fields = set(cls.__dataclass_fields__) - {"process_group"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for method {method!r}; known: {sorted(fields)}")
    return cls(**d)


def load_cache_config(path) -> CacheConfig:
    """A cache config JSON (as `mmkit accel search` writes: `{"method": ..., fields...}`, or its
    `{"config": {...}}` wrapper). Example: `apply_cache(t, load_cache_config("best.json"))`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--cache-config: file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--cache-config {p}: not valid JSON ({e})") from None
    return cache_config_from_dict(d.get("config", d), where=f"--cache-config {p}")
