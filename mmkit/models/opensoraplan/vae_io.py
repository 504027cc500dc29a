"""Reading and writing the OpenSoraPlan 1.3 WF-VAE in its two layouts (tensor names are the same in both):

- release: `vae/config.json` (`_class_name` WFVAEModel) + a `*.ckpt` training checkpoint holding
  `ema_state_dict` (names prefixed `module.`, used when not empty, as the release loader does) or
  `state_dict` (possibly under `gen_model`); read only with `torch.load(weights_only=True)`;
- diffusers: `config.json` + `diffusion_pytorch_model.safetensors` (what `WFVAEModel.from_pretrained`
  also reads when the folder has no `.ckpt`).

Example:
    >>> vae = load_vae("Open-Sora-Plan-v1.3.0/vae")      # either layout
    >>> sd, cfg = read_vae("Open-Sora-Plan-v1.3.0/vae")  # release names, config dict
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mmkit.models.common.hf_io import check_keys, load_state_dict, read_json, save_state_dict
from mmkit.models.opensoraplan.wfvae import WFVAE, WFVAEConfig

CLASS_NAME = "WFVAEModel"
DIFFUSERS_STEM = "diffusion_pytorch_model"
EMA_PREFIX = "module."


def _config(folder: Path) -> dict:
    cfg = read_json(folder / "config.json", "WF-VAE config")
    if cfg.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ValueError(
            f"{folder / 'config.json'}: _class_name={cfg['_class_name']!r}, expected {CLASS_NAME!r}"
        )
    return cfg


def read_ckpt(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The WF-VAE state dict of a release `.ckpt` (EMA weights when present, `module.` stripped).

    Example: `sd = read_ckpt("Open-Sora-Plan-v1.3.0/vae/merged.ckpt")`.
    """
    path = Path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code or classes in it
        raise ValueError(
            f"{path}: cannot be read safely (torch.load weights_only=True refused it: {e}); mmkit never "
            "unpickles arbitrary objects. Convert it to safetensors with the tool that wrote it"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if isinstance(obj.get("ema_state_dict"), dict) and len(obj["ema_state_dict"]) > 0:
        sd = {k.removeprefix(EMA_PREFIX): v for k, v in obj["ema_state_dict"].items()}
    elif isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        sd = sd["gen_model"] if isinstance(sd.get("gen_model"), dict) else sd
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        raise ValueError(
            f"{path}: holds neither ema_state_dict nor state_dict (keys: {sorted(obj)[:6]}); not a WF-VAE checkpoint"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: non-tensor entries {bad[:5]}; not a WF-VAE state dict")
    return sd


def find_ckpt(folder: Path) -> Path | None:
    """The release `.ckpt` of a VAE folder (the last in name order, as the release loader's glob), if any."""
    found = sorted(folder.glob("*.ckpt"))
    return found[-1] if found else None


def check_state(sd: dict[str, torch.Tensor], cfg: WFVAEConfig, where: str) -> None:
    """Every tensor a WF-VAE of `cfg` has, with its shape; raises naming the first differences."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in WFVAE(cfg).state_dict().items()}
    check_keys(want, sd, where)
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {s}" for k, s in want.items() if tuple(sd[k].shape) != s]
    if wrong:
        raise ValueError(f"{where}: tensor shapes differ from the VAE config, e.g. {'; '.join(wrong[:3])}")


def read_vae(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config dict) of a WF-VAE folder in either layout (a `.ckpt` wins, as in the release).

    Example: `sd, cfg = read_vae("osp/vae")`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"WF-VAE folder not found: {folder}")
    cfg = _config(folder)
    ckpt = find_ckpt(folder)
    sd = read_ckpt(ckpt) if ckpt else load_state_dict(folder, stem=DIFFUSERS_STEM)
    check_state(sd, WFVAEConfig.from_dict(cfg, str(folder / "config.json")), str(ckpt or folder))
    return sd, cfg


def load_vae(folder: str | os.PathLike) -> WFVAE:
    """A `WFVAE` (fp32, eval) from a release or diffusers-layout folder. Example: `load_vae("osp/vae")`."""
    sd, cfg = read_vae(folder)
    vae = WFVAE(WFVAEConfig.from_dict(cfg))
    vae.load_state_dict(sd, strict=True)
    return vae.eval()


def write_diffusers(sd: dict[str, torch.Tensor], cfg: dict, out: Path, progress: bool = False) -> Path:
    """`config.json` + `diffusion_pytorch_model.safetensors` in folder `out`."""
    save_state_dict(sd, out, DIFFUSERS_STEM, progress=progress, desc="write VAE")
    (out / "config.json").write_text(json.dumps({"_class_name": CLASS_NAME} | cfg, indent=2) + "\n")
    return out


def write_ckpt(sd: dict[str, torch.Tensor], cfg: dict, out: Path, name: str = "merged.ckpt") -> Path:
    """The release layout: `config.json` + a `.ckpt` with `ema_state_dict` (`module.` names) only.

    The file holds tensors in plain dicts, so `torch.load(weights_only=True)` reads it back.
    """
    out.mkdir(parents=True, exist_ok=True)
    ema = {EMA_PREFIX + k: v.contiguous() for k, v in sd.items()}
    torch.save({"ema_state_dict": ema}, out / name)
    (out / "config.json").write_text(json.dumps({"_class_name": CLASS_NAME} | cfg, indent=2) + "\n")
    return out / name
