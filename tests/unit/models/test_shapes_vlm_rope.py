"""The shapes VLM's language model can tell image rows and columns apart through M-RoPE.

Qwen2.5-VL's vision tower has only relative (rotary) positions, so on a plain background its output
tokens carry no absolute position (a mean-pooled linear probe reads the quadrant at chance); where a
shape is must come from the LLM's M-RoPE (t, h, w) positions. M-RoPE gives the width axis the lowest
frequencies: with the full-size rope_theta 1e6 and head_dim 32, neighbouring image columns differ by
at most 1.8e-4 rad (5e-4 rad across a 4-token row), so a position answer cannot depend on the column.
"""

from __future__ import annotations

import pytest
import torch

from mmkit.models.qwen2_5_vl.language import MRoPE
from mmkit.models.qwen2_5_vl.rope import get_rope_index
from mmkit.models.qwen2_5_vl.shapes import SHAPES_QA_SIZE, shapes_vlm_config
from mmkit.models.qwen2_5_vl.tiny import tiny_config

MIN_STEP_RAD = 0.1  # smallest useful largest-rotation between neighbouring image rows / columns


def largest_step_per_axis(cfg) -> dict[str, float]:
    """Largest rotary angle (rad) between neighbouring image tokens along h and along w, for one
    SHAPES_QA_SIZE image, read from the model's own M-RoPE tables on `get_rope_index` positions."""
    side = SHAPES_QA_SIZE // cfg.vision.patch_size  # patches per side (8)
    ids = torch.tensor([[1] + [cfg.image_token_id] * (side // 2) ** 2 + [2]])
    pos, _ = get_rope_index(
        ids, torch.tensor([[1, side, side]]), image_token_id=cfg.image_token_id, video_token_id=-1
    )
    rope = MRoPE(cfg.text)
    inv_freq, axis = rope.tables(torch.device("cpu"))
    img = pos[:, 0, 1:-1]  # (3, n): t, h, w of the image tokens, raster order
    n = side // 2
    out = {}
    for name, a, step in (("h", 1, n), ("w", 2, 1)):  # next row is n tokens on, next column 1
        d = (img[:, step:] - img[:, :-step]).float()  # (3, n - step) position differences
        assert (d[a] == 1).any()
        angles = d[axis][:, d[a] == 1] * inv_freq[:, None]  # (Dh/2, pairs of neighbours)
        out[name] = float(angles.abs().max())
    return out


def test_shapes_vlm_rope_resolves_image_rows_and_columns():
    cfg = shapes_vlm_config({})
    steps = largest_step_per_axis(cfg)
    assert min(steps.values()) >= MIN_STEP_RAD, (
        f"shapes VLM text rope_theta={cfg.text.rope_theta}: neighbouring image rows/columns rotate by at most "
        f"{steps} rad; the LLM cannot read where a shape is"
    )


@pytest.mark.parametrize("theta", [1e6])
def test_full_size_theta_cannot_resolve_columns(theta):
    """The check above can fail: the full-size rope_theta leaves the width axis unreadable."""
    cfg = tiny_config(None, hidden_size=128, intermediate_size=256, mrope_section=(4, 6, 6), rope_theta=theta)
    assert largest_step_per_axis(cfg)["w"] < 1e-3
