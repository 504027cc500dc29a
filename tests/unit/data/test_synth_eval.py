"""The shapes detector: ~100% right on real synthetic clips (rendered and through H.264), at chance on
noise, and clear errors for captions it cannot judge."""

from __future__ import annotations

import numpy as np
import pytest

from mmkit.data.synth import _combos, caption, render_shape_video, synth_shapes
from mmkit.data.synth_eval import ATTRIBUTES, CHANCE, Tally, detect, parse_caption, score
from mmkit.infer.media import read_video


def test_detector_on_rendered_combinations():
    tally = Tally()
    combos = [_combos()[i] for i in np.random.default_rng(0).permutation(len(_combos()))[:56]]
    assert all(len({c[k] for c in combos}) == len({c[k] for c in _combos()}) for k in range(4))
    for i, combo in enumerate(combos):  # random size, position and speed per clip
        frames = render_shape_video(*combo, 9, 64, 64, np.random.default_rng(i))
        tally.add(score(frames, caption(*combo)))
    assert tally.accuracy() == dict.fromkeys(ATTRIBUTES, 1.0)


def test_detector_on_encoded_mp4_clips(tmp_path):
    shapes = synth_shapes(tmp_path, videos=16, num_frames=17, height=64, width=64, seed=3, progress=False)
    import json

    tally = Tally()
    for item in json.loads(shapes.annotation.read_text()):
        tally.add(score(read_video(tmp_path / item["path"]), item["cap"]))  # uint8 frames after H.264
    assert min(tally.accuracy().values()) >= 0.95, tally.accuracy()


@pytest.mark.parametrize("kind", ["uniform", "blocky"])
def test_detector_sits_at_chance_on_noise(kind):
    rng = np.random.default_rng(0)
    combos = _combos()
    tally = Tally()
    for _ in range(150):
        truth = combos[rng.integers(len(combos))]
        if kind == "uniform":
            frames = rng.random((9, 32, 32, 3), dtype=np.float32)
        else:  # 8x8-pixel blobs of random colour, closer to what an untrained model decodes
            frames = np.clip(rng.normal(0.5, 0.3, (9, 4, 4, 3)), 0, 1).repeat(8, 1).repeat(8, 2)
        tally.add(score(frames, caption(*truth)))
    for k, acc in tally.accuracy().items():
        assert abs(acc - CHANCE[k]) < 0.14, (k, acc, CHANCE[k])  # 150 draws: 0.14 is > 3.5 std


def test_parse_caption_and_its_errors():
    assert parse_caption("a red circle moves left on a black background") == {
        "color": "red", "shape": "circle", "direction": "left", "background": "black",
    }  # fmt: skip
    with pytest.raises(ValueError, match="not a synthetic shapes caption"):
        parse_caption("a cat sleeps")
    with pytest.raises(ValueError, match="shape 'hexagon'"):
        parse_caption("a red hexagon moves left on a black background")
    with pytest.raises(ValueError, match=r"expected \(T, H, W, 3\)"):
        detect(np.zeros((64, 64, 3)))
