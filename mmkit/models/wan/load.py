"""Build a `WanTransformer` from a checkpoint folder in either layout, and write one back out.

Layouts (detected from the weights' key names):
- diffusers: `transformer/config.json` (WanTransformer3DModel) + diffusion_pytorch_model*.safetensors;
- original Wan2.1 release: `config.json` (WanModel) + diffusion_pytorch_model*.safetensors
  with keys like `blocks.0.self_attn.q.weight`; single file or shards with an index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mmkit.device import resolve_device, resolve_dtype
from mmkit.models.common.hf_io import DEFAULT_SHARD_BYTES, check_keys, save_state_dict
from mmkit.models.wan import hf
from mmkit.models.wan.model import WanTransformer


def load_transformer(path: str | os.PathLike, device="cpu", dtype="fp32") -> WanTransformer:
    """Load a Wan2.1 DiT from a diffusers `transformer/` folder or an original-release folder.

    Example: `dit = load_transformer("Wan2.1-T2V-1.3B-Diffusers/transformer", dtype="bf16")`.
    """
    m = hf.ADAPTER.read(Path(path))
    with torch.device("meta"):
        model = WanTransformer(m.cfg)
    check_keys(model.state_dict().keys(), m.state.keys(), m.where)
    model.load_state_dict(m.state, assign=True)  # read aligned (hf_io.load_safetensors)
    return model.to_dtype(resolve_dtype(dtype)).to(resolve_device(str(device))).eval()


def save_transformer(
    model: WanTransformer,
    path: str | os.PathLike,
    layout: str = "diffusers",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write `model` as a diffusers `transformer/` folder or an original-release folder.

    Example: `save_transformer(dit, "export/transformer")` then diffusers'
    `WanTransformer3DModel.from_pretrained("export/transformer")` loads it.
    """
    if layout not in hf.LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {', '.join(hf.LAYOUTS)}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        sd, cfg = hf.to_hf(sd), {**model.cfg.to_dict(), "_diffusers_version": "0.33.0"}
    else:
        sd, cfg = hf.to_original(sd), hf.config_to_original(model.cfg)
    save_state_dict(sd, folder, hf.DIT_STEM, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder
