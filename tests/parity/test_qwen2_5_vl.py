"""Qwen2.5-VL logits parity with transformers (fp32, <= 1e-4) on a tiny random perturbed folder, and the
transformers <-> mmkit converter round trip."""

from __future__ import annotations

import pytest
import torch
from qwen2_5_vl_helpers import left_pad, pixels, prompt
from transformers import Qwen2_5_VLForConditionalGeneration

from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mmkit.models.qwen2_5_vl.hf import from_hf, to_hf
from mmkit.models.qwen2_5_vl.load import load_model
from mmkit.models.qwen2_5_vl.rope import token_type_ids
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl, tiny_config

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = create_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen"), seed=0)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder, device="cpu", dtype="fp32")
    return ref, ours, folder


def _compare(ref, ours, ids, mask=None, valid=None, **vis):
    """Run both models; return max |logit difference| over real (non-padded) positions."""
    cfg = ours.cfg
    types = token_type_ids(ids, cfg.image_token_id, cfg.video_token_id)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **vis).logits
        b = ours(ids, attention_mask=mask, **vis)
    assert a.shape == b.shape
    assert a.abs().max() > 1.0  # logits are not degenerate: a wrong model cannot pass by accident
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return (a - b)[keep].abs().max().item()


def test_text_only(models):
    ref, ours, _ = models
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    assert _compare(ref, ours, ids) <= TOL


def test_one_image(models):
    ref, ours, _ = models
    g = torch.Generator().manual_seed(2)
    grid = (1, 16, 12)  # 8x6 merged tokens: 4 windows of 4x4 units, two of them ragged
    ids = torch.tensor([prompt(ours.cfg, g, [5, ("image", grid), 7])])
    err = _compare(ref, ours, ids, pixel_values=pixels([grid], g), image_grid_thw=torch.tensor([grid]))
    assert err <= TOL


def test_two_images_of_different_sizes(models):
    ref, ours, _ = models
    g = torch.Generator().manual_seed(3)
    grids = [(1, 8, 8), (1, 12, 20)]
    ids = torch.tensor([prompt(ours.cfg, g, [3, ("image", grids[0]), 4, ("image", grids[1]), 6])])
    err = _compare(ref, ours, ids, pixel_values=pixels(grids, g), image_grid_thw=torch.tensor(grids))
    assert err <= TOL


def test_one_video(models):
    ref, ours, _ = models
    g = torch.Generator().manual_seed(4)
    grid = (3, 8, 12)  # 6 frames -> 3 temporal grids; time ids 0, 2, 4 (1 s per grid, 2 tokens/s)
    ids = torch.tensor([prompt(ours.cfg, g, [4, ("video", grid), 5])])
    vis = dict(
        pixel_values_videos=pixels([grid], g),
        video_grid_thw=torch.tensor([grid]),
        second_per_grid_ts=torch.tensor([1.0]),
    )
    assert _compare(ref, ours, ids, **vis) <= TOL


def test_left_padded_batch_of_two(models):
    ref, ours, _ = models
    g = torch.Generator().manual_seed(5)
    grids = [(1, 8, 12), (1, 8, 8)]
    rows = [
        prompt(ours.cfg, g, [6, ("image", grids[0]), 9]),
        prompt(ours.cfg, g, [2, ("image", grids[1]), 3]),
    ]
    ids, mask = left_pad(rows, pad_id=ours.cfg.pad_token_id)
    assert mask[1, 0] == 0  # row 1 really is padded
    err = _compare(ref, ours, ids, mask, pixel_values=pixels(grids, g), image_grid_thw=torch.tensor(grids))
    assert err <= TOL


@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep_matches_full(models, keep):
    _, ours, _ = models
    g = torch.Generator().manual_seed(6)
    grids = [(1, 8, 8), (1, 8, 12)]
    rows = [
        prompt(ours.cfg, g, [3, ("image", grids[0]), 4]),
        prompt(ours.cfg, g, [9, ("image", grids[1]), 6]),
    ]
    ids, mask = left_pad(rows, pad_id=ours.cfg.pad_token_id)
    vis = dict(pixel_values=pixels(grids, g), image_grid_thw=torch.tensor(grids))
    with torch.no_grad():
        for m in (mask, None):  # padded (explicit mask) and unpadded (implicit causal) paths
            full = ours(ids, attention_mask=m, **vis)
            last = ours(ids, attention_mask=m, logits_to_keep=keep, **vis)
            assert last.shape == (2, keep, ours.cfg.text.vocab_size)
            torch.testing.assert_close(last, full[:, -keep:], rtol=1e-5, atol=1e-5)


def test_bf16_forward_tracks_fp32(models):
    _, ours, folder = models
    low = load_model(folder, device="cpu", dtype="bf16")
    g = torch.Generator().manual_seed(8)
    grid = (1, 8, 12)
    ids = torch.tensor([prompt(ours.cfg, g, [4, ("image", grid), 4])])
    vis = dict(pixel_values=pixels([grid], g), image_grid_thw=torch.tensor([grid]))
    with torch.no_grad():
        ref, got = ours(ids, **vis), low(ids, **vis)
    assert got.dtype == torch.bfloat16
    # measured 1.41% of the logits' range (fixed inputs and weights: stable); ~2x that
    assert (got.float() - ref).abs().max() < 0.03 * ref.abs().max()


def test_image_token_mismatch_names_the_sample(models):
    _, ours, _ = models
    g = torch.Generator().manual_seed(7)
    grid = (1, 8, 8)
    good = prompt(ours.cfg, g, [2, ("image", grid), 2])
    bad = good[:5] + good[6:] + [1]  # one placeholder fewer than its grid needs
    ids, mask = left_pad([good, bad], pad_id=ours.cfg.pad_token_id)
    vis = dict(pixel_values=pixels([grid, grid], g), image_grid_thw=torch.tensor([grid, grid]))
    with pytest.raises(
        ValueError, match=r"sample 1: image 1 \(grid_thw \[1, 8, 8\]\) needs 16 placeholder tokens"
    ):
        ours(ids, attention_mask=mask, **vis)
    # with precomputed positions the embedding step still refuses, before running the vision tower
    pos = torch.arange(ids.shape[1]).expand(3, 2, -1)
    with pytest.raises(ValueError, match="sample 1: 15 image placeholder tokens"):
        ours(ids, attention_mask=mask, position_ids=pos, **vis)


def test_converter_round_trip_is_bit_exact(models):
    ref, ours, _ = models
    hf_sd = ref.state_dict()
    back = to_hf(from_hf(hf_sd, ours.cfg), ours.cfg)
    assert back.keys() == hf_sd.keys()
    for k, v in hf_sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # and the original Qwen release layout (visual.*, model.layers.*) reads back to the same tensors
    legacy = to_hf(from_hf(hf_sd, ours.cfg), ours.cfg, legacy=True)
    assert any(k.startswith("visual.blocks.") for k in legacy)
    again = to_hf(from_hf(legacy, ours.cfg), ours.cfg)
    assert all(torch.equal(again[k], hf_sd[k]) for k in hf_sd)


def test_converter_reports_missing_and_unexpected_keys(models):
    ref, ours, _ = models
    sd = dict(ref.state_dict())
    sd.pop("model.visual.merger.ln_q.weight")
    sd["model.visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing: model\.visual\.merger\.ln_q\.weight"):
        from_hf(sd, ours.cfg)


def test_config_written_by_transformers_reads_back(models, tmp_path):
    ref, ours, _ = models
    ref.config.save_pretrained(tmp_path)
    cfg = Qwen2_5_VLConfig.from_pretrained(tmp_path)
    assert cfg.vision == ours.cfg.vision and cfg.text == ours.cfg.text
    assert (cfg.image_token_id, cfg.video_token_id) == (ours.cfg.image_token_id, ours.cfg.video_token_id)


def test_tied_embeddings_folder(tmp_path):
    cfg = tiny_config()
    cfg.tie_word_embeddings = True  # as in the 3B checkpoint: no lm_head.weight in the files
    folder = create_tiny_qwen2_5_vl(tmp_path, seed=2, cfg=cfg)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder, device="cpu")
    assert ours.language.lm_head.weight is ours.language.embed_tokens.weight
    g = torch.Generator().manual_seed(9)
    grid = (1, 8, 8)
    ids = torch.tensor([prompt(ours.cfg, g, [3, ("image", grid), 3])])
    assert (
        _compare(ref, ours, ids, pixel_values=pixels([grid], g), image_grid_thw=torch.tensor([grid])) <= TOL
    )
