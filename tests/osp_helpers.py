"""Tiny OpenSoraPlan 1.3 training material built locally: a release-layout DiT folder and a folder of
precomputed features (random latents and caption features in the `mmkit.data.features` layout)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmkit import registry
from mmkit.models.common.hf_io import save_state_dict
from mmkit.models.opensoraplan.hf import DIT_STEM, to_hf


def write_tiny_dit(
    out: Path, flavor: str = "tiny", seed: int = 0, num_layers: int | None = None, **overrides
) -> Path:
    """A random tiny DiT (weights off their init so parity can fail) as a release folder; `overrides`
    replace config fields (e.g. num_attention_heads=3, attention_head_dim=12, cross_attention_dim=36)."""
    import dataclasses

    spec = registry.get("opensoraplan")
    cfg = spec.flavor(flavor)
    if num_layers is not None:
        overrides["num_layers"] = num_layers
    cfg = dataclasses.replace(cfg, **overrides).validate()
    torch.manual_seed(seed)
    model = spec.build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_state_dict(to_hf(model.state_dict()), out, DIT_STEM)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return out


def write_features(
    out: Path,
    task: str = "t2v",
    n: int = 8,
    latent=(8, 3, 6, 10),
    text_len: int = 8,
    dim: int = 32,
    seed: int = 0,
    sizes: list[tuple[int, int, int]] | None = None,
) -> Path:
    """`n` samples of random features: latents (C, T, H, W), caption features of 2..text_len tokens (i2v:
    also random masked-video latents and the frames to generate, per mask type).
    `sizes` (T, H, W) per sample, cycled: clips of different sizes (batches of them are padded)."""
    g = torch.Generator().manual_seed(seed)
    (out / "features").mkdir(parents=True, exist_ok=True)
    save_file({"text_context": torch.randn(1, dim, generator=g)}, str(out / "null_text.safetensors"))
    samples = []
    for i in range(n):
        L = int(torch.randint(2, text_len + 1, (1,), generator=g))
        shape = latent if sizes is None else (latent[0], *sizes[i % len(sizes)])
        t = {"latents": torch.randn(*shape, generator=g), "text_context": torch.randn(L, dim, generator=g)}
        if task == "i2v":  # stand-ins for the masked videos' latents, two draws of the random types
            from mmkit.models.opensoraplan.masks import MASK_TYPES, pixel_mask
            from mmkit.train.tasks.opensoraplan import DRAWN_TYPES, mask_rng

            frames = (shape[1] - 1) * 4 + 1
            for kind in MASK_TYPES:
                draws = range(2 if kind in DRAWN_TYPES else 1)
                t[f"masked_{kind}"] = torch.randn(len(draws), *shape, generator=g)
                t[f"gen_{kind}"] = torch.stack(
                    [pixel_mask(kind, frames, 1, 1, rng=mask_rng(i, kind, j))[:, 0, 0, 0] for j in draws]
                )
        save_file(t, str(out / f"features/{i:06d}.safetensors"))
        samples.append(
            {"file": f"features/{i:06d}.safetensors", "caption": f"clip {i}", "source": f"clip{i}.mp4"}
        )
    (out / "index.json").write_text(json.dumps({"task": task, "text_len": text_len, "samples": samples}))
    return out
