"""M-RoPE position ids by value, and config reading (both config.json layouts, flavors)."""

from __future__ import annotations

import pytest
import torch

from mmkit.models.qwen2_5_vl.config import FLAVORS, Qwen2_5_VLConfig, flavor
from mmkit.models.qwen2_5_vl.rope import get_rope_index

IMG, VID = 50, 51
KW = dict(image_token_id=IMG, video_token_id=VID, spatial_merge_size=2, tokens_per_second=2)


def test_image_positions_by_value():
    # 2 text, a 2x3-token image (grid 1x4x6), 2 text
    ids = torch.tensor([[7, 8] + [IMG] * 6 + [9, 10]])
    pos, delta = get_rope_index(ids, image_grid_thw=torch.tensor([[1, 4, 6]]), **KW)
    assert pos[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]  # time
    assert pos[1, 0].tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]  # rows
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]  # columns
    assert delta.tolist() == [[7 - 10]]


def test_video_time_is_scaled_and_text_resumes_after_the_largest_position():
    # 3 temporal grids of 1x1 merged tokens, 2 s per grid at 2 tokens/s -> time 0, 4, 8 (+ start 2).
    # Text resumes at max + 1 = 11 (original Qwen rule; transformers 5.24 would resume at 3).
    ids = torch.tensor([[7, 8, VID, VID, VID, 9]])
    pos, delta = get_rope_index(
        ids, video_grid_thw=torch.tensor([[3, 2, 2]]), second_per_grid_ts=torch.tensor([2.0]), **KW
    )
    assert pos[0, 0].tolist() == [0, 1, 2, 6, 10, 11]
    assert pos[1, 0].tolist() == [0, 1, 2, 2, 2, 11]
    assert delta.tolist() == [[12 - 6]]


def test_fractional_seconds_truncate_per_grid_step():
    ids = torch.tensor([[VID] * 4])  # 4 temporal grids, 0.75 s each at 2 tokens/s -> 0, 1.5, 3, 4.5
    pos, _ = get_rope_index(ids, video_grid_thw=torch.tensor([[4, 2, 2]]), second_per_grid_ts=[0.75], **KW)
    assert pos[0, 0].tolist() == [0, 1, 3, 4]


def test_left_padding_and_batch_order_of_grids():
    grids = torch.tensor([[1, 2, 2], [1, 2, 4]])  # row 0 owns image 0, row 1 owns image 1
    ids = torch.tensor([[0, 0, 0, 5, IMG, 6], [5, IMG, IMG, 6, 6, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos, delta = get_rope_index(ids, image_grid_thw=grids, attention_mask=mask, **KW)
    assert pos[0, 0].tolist() == [0, 0, 0, 0, 1, 2]
    assert pos[2, 1].tolist() == [0, 1, 2, 3, 4, 5]
    assert pos[0, 1].tolist() == [0, 1, 1, 3, 4, 5]
    assert delta.tolist() == [[0], [0]]


def test_too_few_placeholders_names_the_sample():
    ids = torch.tensor([[5, IMG, 6], [5, IMG, IMG]])
    with pytest.raises(ValueError, match="sample 1: image 1"):
        get_rope_index(ids, image_grid_thw=torch.tensor([[1, 2, 2], [1, 4, 4]]), **KW)


def _legacy_3b_config() -> dict:
    """The original Qwen/Qwen2.5-VL-3B-Instruct config.json layout (text fields at the top level)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    }


def test_legacy_config_layout_equals_the_3b_flavor():
    cfg = Qwen2_5_VLConfig.from_hf_dict(_legacy_3b_config())
    ref = flavor("3B")
    assert cfg.text == ref.text and cfg.vision == ref.vision and cfg.tie_word_embeddings
    assert Qwen2_5_VLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg  # 5.x layout round trip


@pytest.mark.parametrize(
    "name, width, layers, heads, kv",
    [("3B", 2048, 36, 16, 2), ("7B", 3584, 28, 28, 4), ("32B", 5120, 64, 40, 8), ("72B", 8192, 80, 64, 8)],
)
def test_flavors_match_public_configs(name, width, layers, heads, kv):
    c = FLAVORS[name]()
    t = c.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        width,
        layers,
        heads,
        kv,
    )
    assert (c.vision.depth, c.vision.hidden_size, c.vision.num_heads) == (32, 1280, 16)
    assert c.vision.fullatt_block_indexes == (7, 15, 23, 31) and c.vision.out_hidden_size == width


def test_bad_config_names_the_field():
    d = _legacy_3b_config()
    d["num_key_value_heads"] = 3
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        Qwen2_5_VLConfig.from_hf_dict(d)
