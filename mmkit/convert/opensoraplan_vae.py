"""OpenSoraPlan 1.3 WF-VAE: the release folder (`config.json` + `*.ckpt`) <-> the diffusers layout
(`config.json` + `diffusion_pytorch_model.safetensors`). Tensor names are the same in both; the release
`.ckpt` is read with `torch.load(weights_only=True)` (EMA weights when present, `module.` stripped) and
written back as `{"ema_state_dict": {"module.<name>": tensor}}`. Both directions are bit-exact.

Example:
    >>> convert_vae("Open-Sora-Plan-v1.3.0/vae", "vae_diffusers", to="diffusers")
    >>> convert_vae("vae_diffusers", "vae_release", to="original")
"""

from __future__ import annotations

import os
from pathlib import Path

from mmkit.checkpoint.common import check_out, new_dir
from mmkit.models.opensoraplan import vae_io

COMMAND = "convert vae-convert"  # the marker of the folders it writes


def _source(src: Path) -> Path:
    """The VAE folder: `src`, its `vae/` (a pipeline folder), or the folder of a `.ckpt` file."""
    if src.is_file() and src.suffix == ".ckpt":
        return src.parent
    if (src / "model_index.json").is_file():
        return src / "vae"
    return src


def convert_vae(
    src: str | os.PathLike, out: str | os.PathLike, to: str, progress: bool = True, overwrite: bool = False
) -> Path:
    """Convert a WF-VAE folder between the release `.ckpt` layout ("original") and "diffusers".

    `to="auto"` picks the other layout than the source's. `src` is a VAE folder in either layout (or a pipeline folder with `vae/`, or the `.ckpt` itself, whose
    folder must hold `config.json`); `out` is a new or empty folder, or with `overwrite` an earlier mmkit output
    (swapped only once the new one is complete). Returns what was written.
    Example: `convert_vae("osp/vae", "vae_diffusers", to="diffusers")`.
    """
    src, out = Path(src), Path(out)
    if to == "auto":  # the other layout than the source's
        to = "diffusers" if src.suffix == ".ckpt" or vae_io.find_ckpt(_source(src)) else "original"
    if to not in ("diffusers", "original"):
        raise ValueError(f"--to {to!r}: choose 'diffusers' or 'original'")
    check_out(out, COMMAND, overwrite)  # before any weights are read
    folder = _source(src)
    if src.is_file():
        sd = vae_io.read_ckpt(src)
        cfg = vae_io._config(folder)
        vae_io.check_state(sd, vae_io.WFVAEConfig.from_dict(cfg, str(folder / "config.json")), str(src))
    else:
        sd, cfg = vae_io.read_vae(folder)
    cfg = {k: v for k, v in cfg.items() if k != "_class_name"}
    with new_dir(out, COMMAND, overwrite) as tmp:
        if to == "diffusers":
            vae_io.write_diffusers(sd, cfg, tmp, progress)
            return out
        return out / vae_io.write_ckpt(sd, cfg, tmp).name
