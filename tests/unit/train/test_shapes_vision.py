"""Vision pretraining for the shapes VLM: labels match the rendered objects, only the tower changes,
and the folder it writes loads through the real loader."""

import json

import numpy as np
import pytest
import torch

from mmkit.data.synth import QA_POSITIONS, render_qa_image
from mmkit.models.qwen2_5_vl.load import load_vlm
from mmkit.models.qwen2_5_vl.tiny import create_tiny_qwen2_5_vl
from mmkit.train.shapes_vision import _COLORS, _SHAPES, pretrain_shapes_vision, quadrant_batch


def test_quadrant_labels_are_the_rendered_objects(tmp_path):
    _, processor = load_vlm(create_tiny_qwen2_5_vl(tmp_path / "init"), device="cpu")
    rows, grids, ys, yc = quadrant_batch(6, 112, np.random.default_rng([0, 5]), processor.image_cfg)
    assert rows.shape[0] == 6 * 64 and grids.tolist() == [[1, 8, 8]] * 6
    rng = np.random.default_rng([0, 5])
    for i in range(6):
        _, objects = render_qa_image(112, rng)
        want_s, want_c = torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)
        for color, shape, where in objects:
            r, c = QA_POSITIONS[where]
            want_s[r, c], want_c[r, c] = _SHAPES.index(shape), _COLORS.index(color)
        assert torch.equal(ys[i], want_s) and torch.equal(yc[i], want_c)
        assert int((ys[i] > 0).sum()) == len(objects)


def test_pretrain_changes_the_tower_only_and_loads(tmp_path):
    init = create_tiny_qwen2_5_vl(tmp_path / "init")
    report = pretrain_shapes_vision(
        init, tmp_path / "vision", steps=3, batch=4, eval_images=8, progress=False
    )
    assert set(report) == {"steps", "seconds", "shape_accuracy", "color_accuracy"}
    assert json.loads((tmp_path / "vision" / "vision_pretrain.json").read_text()) == report
    before, _ = load_vlm(init, device="cpu")
    after, processor = load_vlm(tmp_path / "vision", device="cpu")
    b, a = before.state_dict(), after.state_dict()
    assert b.keys() == a.keys()
    tower = [k for k in b if k.startswith("visual.") and not k.startswith("visual.merger")]
    assert tower and all(not torch.equal(b[k], a[k]) for k in tower if k.endswith("weight") and b[k].ndim > 1)
    assert all(torch.equal(b[k], a[k]) for k in b if k.startswith("language."))
    assert processor.tokenizer is not None


def test_refuses_a_size_without_whole_quadrants(tmp_path):
    with pytest.raises(ValueError, match="size=100"):
        pretrain_shapes_vision(tmp_path / "missing", tmp_path / "out", size=100)
