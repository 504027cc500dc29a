"""Vision pretraining for the shapes VLM: the ViT learns what each quadrant of a shapes-qa image holds.

Qwen2.5-VL starts its multimodal training from a pretrained vision encoder. The shapes VLM starts from
a random one, and SFT alone does not teach it the shape classes: through the LLM the tower learned
colours, counts and positions while shape answers stayed near chance (38% after 2400 steps at width 96,
42% after 1900 at width 128), though the same tower, supervised directly, tells circles, squares and
triangles apart within 300 steps; and SFT with the tower trainable erased the features this stage gives
it (a linear probe: 100% -> 70% in 1000 steps), so SFT runs with the tower frozen.
`pretrain_shapes_vision` is that direct stage: images from `render_qa_image` (the shapes-qa renderer),
the tower's merged tokens max-pooled per quadrant, and two linear heads (shape class or none, colour
or none) under cross-entropy. The heads are thrown away; the folder it writes is the
start folder of SFT (`scripts/pretrain_shapes_vlm.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmkit.data.synth import COLORS, QA_POSITIONS, SHAPES, render_qa_image
from mmkit.models.common.hf_io import save_state_dict
from mmkit.models.qwen2_5_vl.hf import to_hf
from mmkit.models.qwen2_5_vl.load import load_vlm
from mmkit.models.qwen2_5_vl.processor import process_image
from mmkit.outputs import claim_output_dir

_SHAPES = ("none", *SHAPES)
_COLORS = ("none", *COLORS)


def quadrant_batch(
    n: int, size: int, rng, image_cfg
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` shapes-qa images as (patch rows, grid_thw (n, 3), shape labels (n, 2, 2), colour labels
    (n, 2, 2)); label 0 is an empty quadrant. Example: `quadrant_batch(32, 112, rng, processor.image_cfg)`."""
    rows, grids = [], []
    shape_y = torch.zeros(n, 2, 2, dtype=torch.long)
    color_y = torch.zeros(n, 2, 2, dtype=torch.long)
    for i in range(n):
        img, objects = render_qa_image(size, rng)
        for color, shape, where in objects:
            r, c = QA_POSITIONS[where]
            shape_y[i, r, c], color_y[i, r, c] = _SHAPES.index(shape), _COLORS.index(color)
        patches, thw = process_image(img, image_cfg)
        rows.append(torch.from_numpy(patches))
        grids.append(thw)
    return torch.cat(rows), torch.tensor(grids), shape_y, color_y


def _quadrant_features(
    visual: nn.Module, rows, grids, n: int, merge: int, patch: int, size: int
) -> torch.Tensor:
    g = size // (patch * merge)  # merged tokens per side (processor order: row-major per image)
    f = visual(rows, grids).view(n, 2, g // 2, 2, g // 2, -1)
    return f.amax(dim=(2, 4))  # (n, 2, 2, D): max over each quadrant's tokens


def pretrain_shapes_vision(
    init: str | os.PathLike,
    out: str | os.PathLike,
    steps: int = 400,
    batch: int = 32,
    lr: float = 1e-3,
    size: int = 112,
    seed: int = 0,
    eval_images: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train the vision tower of the Qwen2.5-VL folder `init`; write the whole model to `out` (the other
    files copied) with `vision_pretrain.json` ({steps, seconds, shape_accuracy, color_accuracy} per
    quadrant on `eval_images` held-out images). Returns that dict.

    Example: `pretrain_shapes_vision("work/init", "work/vision", steps=400)`.
    """
    if size % 56:
        raise ValueError(f"size={size}: use a multiple of 56 (2 x 2 quadrants of whole merged tokens)")
    model, processor = load_vlm(init, device="cpu", dtype="fp32")
    v = model.cfg.vision
    if v.patch_size * v.spatial_merge_size * 2 > size:
        raise ValueError(f"size={size} is smaller than 2 x 2 merged tokens of the vision config")
    dim = v.out_hidden_size
    torch.manual_seed(seed)  # the heads' initialisation
    heads = nn.ModuleDict({"shape": nn.Linear(dim, len(_SHAPES)), "color": nn.Linear(dim, len(_COLORS))})
    visual = model.visual
    visual.train()
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 1])
    cfg = processor.image_cfg
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="vision pretraining", unit="step", disable=not progress)
    for _ in bar:
        rows, grids, ys, yc = quadrant_batch(batch, size, rng, cfg)
        q = _quadrant_features(visual, rows, grids, batch, v.spatial_merge_size, v.patch_size, size)
        loss = F.cross_entropy(heads["shape"](q).flatten(0, 2), ys.flatten())
        loss = loss + F.cross_entropy(heads["color"](q).flatten(0, 2), yc.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    visual.eval()
    rows, grids, ys, yc = quadrant_batch(eval_images, size, np.random.default_rng([seed, 2]), cfg)
    with torch.no_grad():
        q = _quadrant_features(visual, rows, grids, eval_images, v.spatial_merge_size, v.patch_size, size)
        occupied = ys > 0
        shape_acc = (heads["shape"](q).argmax(-1) == ys)[occupied].float().mean().item()
        color_acc = (heads["color"](q).argmax(-1) == yc)[occupied].float().mean().item()
    report = {
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "shape_accuracy": round(shape_acc, 4),
        "color_accuracy": round(color_acc, 4),
    }
    dest = claim_output_dir(out, "shapes vision pretraining", overwrite)
    for f in Path(init).iterdir():  # config, tokenizer, processor files; the weights are rewritten
        if f.is_file() and not f.name.startswith("model") and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)
    save_state_dict(to_hf(model.state_dict(), model.cfg), dest, "model")
    (dest / "vision_pretrain.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
