"""The shipped shapes VLM: a tiny Qwen2.5-VL fine-tuned on synthetic shape Q&A images.

`scripts/pretrain_shapes_vlm.py` trains it and `save_qwen_shapes_asset` packs the exported
transformers folder into one file, `mmkit/assets/shapes_qwen.safetensors`: the weights in bf16 under
their Hugging Face names, and every side file (config.json, tokenizer, chat template, preprocessor) as
text in the safetensors metadata, so nothing is rebuilt and the folder is exactly what was trained.
`create_qwen_shapes` (`mmkit create-tiny qwen-shapes DIR`) unpacks it into a transformers-layout folder
that `load_vlm` and transformers read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from mmkit.outputs import claim_output_dir

SHAPES_QWEN_ASSET = "shapes_qwen.safetensors"  # in mmkit/assets, written by scripts/pretrain_shapes_vlm.py
SHAPES_QA_SIZE = 112  # training image side in pixels (8 x 8 patches of 14 -> 16 merged image tokens)
SHAPES_QA_EVAL_SEED = 1000  # held-out images: another seed than the training set's 0
_FILE_KEY = "file:"  # metadata key prefix of a packed side file
# Wider and deeper than the test-sized `tiny_config` (vision 2 x 32, LLM 2 x 64). Width alone did not
# teach the shape classes through SFT; a pretrained, frozen tower did (scripts/pretrain_shapes_vlm.py).
# rope_theta 10, not Qwen's 1e6: the vision tower has only relative positions, so where a shape lies
# reaches the LLM only through the M-RoPE (h, w) positions of the 4 x 4 image tokens. M-RoPE gives h and w
# the lowest of the 16 rotary frequencies; at 1e6 neighbouring columns differ by at most 1.8e-4 rad and
# rows by 0.03 rad (the asset trained so answered position questions at chance); at 10 by 0.24 and 0.56.
SHAPES_QWEN_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "mrope_section": (4, 6, 6),  # head_dim 32: 16 rotary pairs for (t, h, w)
    "rope_theta": 10.0,
    "num_hidden_layers": 4,
}
SHAPES_QWEN_VISION = {
    "depth": 4,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_heads": 4,
    "fullatt_block_indexes": (1, 3),
}


def shapes_vlm_config(token_ids: dict[str, int]):
    """The shapes VLM's architecture: `tiny_config` widened by SHAPES_QWEN_TEXT / SHAPES_QWEN_VISION.

    Example: `create_tiny_qwen2_5_vl(d, cfg=shapes_vlm_config(build_tiny_tokenizer(d)))`.
    """
    import dataclasses

    from mmkit.models.qwen2_5_vl.tiny import tiny_config

    cfg = tiny_config(dict(token_ids), **SHAPES_QWEN_TEXT)
    vision = {**SHAPES_QWEN_VISION, "out_hidden_size": SHAPES_QWEN_TEXT["hidden_size"]}
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision))


def save_qwen_shapes_asset(ckpt: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, int]:
    """Export the latest checkpoint in `ckpt` and pack it as the asset `out`; returns (path, step).

    Example: `save_qwen_shapes_asset("outputs/pretrain_shapes_vlm/ckpt", "shapes_qwen.safetensors")`.
    """
    from safetensors.torch import save_file

    from mmkit.checkpoint.dcp import read_checkpoint_info
    from mmkit.convert.export import export_to_hf
    from mmkit.models.common.hf_io import load_state_dict

    info = read_checkpoint_info(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_to_hf(ckpt, Path(tmp) / "hf", progress=False)
        sd = load_state_dict(folder)
        meta = {"step": str(info.step)}
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
                meta[_FILE_KEY + f.name] = f.read_text()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(out), metadata=meta)
    return out, info.step


def create_qwen_shapes(
    outdir: str | os.PathLike,
    seed: int = 0,
    asset: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Unpack the shipped shapes VLM into a transformers-layout Qwen2.5-VL folder; returns `outdir`.

    Weights are written in float32 (config.json says so). `seed` is accepted for the create-tiny
    interface and must be 0. Example: `create_qwen_shapes("/tmp/qwen-shapes")` then
    `mmkit chat --model /tmp/qwen-shapes --image shape.png --prompt "What color is the circle?"`.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mmkit.models.common.hf_io import save_state_dict

    if seed != 0:
        raise ValueError(f"qwen-shapes: seed={seed}; the shipped model has fixed weights (use seed 0)")
    if asset is None:
        from mmkit.assets import asset_path

        asset = asset_path(SHAPES_QWEN_ASSET)
    asset = Path(asset)
    with safe_open(str(asset), framework="pt") as f:
        meta = f.metadata() or {}
    files = {k[len(_FILE_KEY) :]: v for k, v in meta.items() if k.startswith(_FILE_KEY)}
    if "config.json" not in files:
        raise ValueError(f"{asset}: no packed config.json; rewrite it with scripts/pretrain_shapes_vlm.py")
    out = claim_output_dir(outdir, "create-tiny qwen-shapes", overwrite)
    for name, text in files.items():
        if name == "config.json":
            cfg = json.loads(text)
            cfg["dtype"] = "float32"
            text = json.dumps(cfg, indent=2) + "\n"
        (out / name).write_text(text)
    sd = {k: v.float() for k, v in load_file(str(asset)).items()}
    save_state_dict(sd, out, "model")
    return out
