"""Synthetic sets: exact MindSpeed / messages formats, captions and answers that match the pixels."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from mmkit.cli.main import main
from mmkit.data.sft import IGNORE_INDEX, SFTDataset
from mmkit.data.synth import (
    BACKGROUNDS,
    COLORS,
    NUM_HELDOUT,
    QA_POSITIONS,
    _combos,
    _split,
    synth_shapes,
    synth_shapes_qa,
)
from mmkit.data.synth_eval import _circular_mean
from mmkit.data.video import VideoDataset
from mmkit.infer.media import read_video
from mmkit.models.qwen2_5_vl.processor import Qwen2_5_VLProcessor
from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer

CAPTION = re.compile(r"a (\w+) (circle|square|triangle) moves (left|right|up|down) on a (\w+) background")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return synth_shapes(
        tmp_path_factory.mktemp("shapes"),
        videos=8,
        num_frames=9,
        height=64,
        width=64,
        fps=8,
        seed=3,
        progress=False,
    )


def nearest(rgb, table) -> str:
    return min(table, key=lambda k: np.abs(np.asarray(table[k], float) - rgb).sum())


def classify(mask: np.ndarray) -> str:
    """circle / square / triangle from how much of its bounding box a blob fills (pi/4, 1, 1/2)."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def test_files_and_annotation_format_exactly(shapes):
    root = shapes.root
    assert shapes.data_txt.read_text() == f"{root},{root / 'annotation.json'}\n"
    items = json.loads(shapes.annotation.read_text())
    assert len(items) == shapes.videos == 8
    for i, it in enumerate(items):
        assert set(it) == {"path", "cap", "num_frames", "fps", "resolution"}
        assert it["path"] == f"videos/{i:06d}.mp4"
        assert CAPTION.fullmatch(it["cap"])
        assert (it["num_frames"], it["fps"], it["resolution"]) == (9, 8, {"height": 64, "width": 64})
        assert read_video(root / it["path"]).shape == (9, 64, 64, 3)
    assert json.loads((root / "heldout_prompts.json").read_text()) == shapes.heldout_prompts
    ds = VideoDataset(shapes.data_txt, num_frames=9, height=32, width=32, train_fps=8, progress=False)
    assert len(ds) == 8 and ds[0]["video"].shape == (3, 9, 32, 32) and ds[0]["caption"] == items[0]["cap"]


def test_captions_match_the_drawn_video(shapes):
    for it in json.loads(shapes.annotation.read_text()):
        color, shape, direction, background = CAPTION.fullmatch(it["cap"]).groups()
        frames = read_video(shapes.root / it["path"]).astype(float)  # (T, H, W, 3)
        assert nearest(frames[0, 0, 0], BACKGROUNDS) == background  # a corner is background
        dist = np.abs(frames - np.asarray(BACKGROUNDS[background], float)).sum(-1)  # (T, H, W)
        fg = dist > dist.max() / 2  # half the contrast: the edge blur of H.264 falls on either side
        assert nearest(frames[fg].mean(0), COLORS) == color
        whole = [m for m in fg if not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())]
        assert classify(whole[0]) == shape  # a frame where no edge cuts the shape
        ys, xs = np.nonzero(whole[0])
        r = (max(np.ptp(ys), np.ptp(xs)) + 1) / (1.6 if shape == "square" else 2.0)  # the half-size
        # the size marks the sense: r 7.3-9.8 px moving left / up, 11.3-15.3 px moving right / down
        assert (r > 10.5) == (direction in ("right", "down")), (it["cap"], r)
        pos = np.array(
            [[_circular_mean(np.nonzero(m)[1], 64), _circular_mean(np.nonzero(m)[0], 64)] for m in fg]
        )
        moves = (np.diff(pos, axis=0) + 32) % 64 - 32  # (x, y) per frame, the shortest way round
        want = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        assert moves.sum(0) @ np.array(want) > 15  # ~3 px per frame over 8 frames
        assert abs(moves.sum(0) @ np.array(want[::-1])) < 2  # and none across it
        assert (moves @ np.array(want) > 0).all()  # every frame moves forward, across the edges too


def test_heldout_prompts_never_in_training(shapes):
    train = {it["cap"] for it in json.loads(shapes.annotation.read_text())}
    assert len(shapes.heldout_prompts) == NUM_HELDOUT
    assert not train & set(shapes.heldout_prompts)
    # held-out combinations reuse words seen in training when possible
    for prompt in shapes.heldout_prompts:
        words = CAPTION.fullmatch(prompt).groups()
        seen = [{CAPTION.fullmatch(c).groups()[k] for c in train} for k in range(4)]
        assert sum(w in s for w, s in zip(words, seen)) >= 3
    # with more clips than combinations, training cycles through all combinations but the held-out ones
    combos, held = _split(400, np.random.default_rng(0))
    assert set(combos) == set(_combos()) - set(held) and len(held) == NUM_HELDOUT
    assert not any(c == b for c, _, _, b in _combos())  # no invisible blue-on-blue clip


def test_deterministic_per_seed(tmp_path, shapes):
    again = synth_shapes(
        tmp_path / "a", videos=8, num_frames=9, height=64, width=64, fps=8, seed=3, progress=False
    )
    assert again.annotation.read_text() == shapes.annotation.read_text()
    assert again.heldout_prompts == shapes.heldout_prompts
    assert np.array_equal(
        read_video(again.root / "videos/000005.mp4"), read_video(shapes.root / "videos/000005.mp4")
    )
    other = synth_shapes(
        tmp_path / "b", videos=8, num_frames=9, height=64, width=64, fps=8, seed=4, progress=False
    )
    assert other.annotation.read_text() != shapes.annotation.read_text()


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return synth_shapes_qa(
        tmp_path_factory.mktemp("qa"), images=12, size=112, turns=2, seed=1, progress=False
    )


def objects_in(img: np.ndarray) -> dict[str, tuple[str, str]]:
    """{colour: (shape, quadrant)} read back from a lossless PNG."""
    out = {}
    half = img.shape[0] / 2
    for name, rgb in COLORS.items():
        mask = (img == np.asarray(rgb, np.uint8)).all(-1)
        if mask.any():
            ys, xs = np.nonzero(mask)
            where = [
                k for k, (r, c) in QA_POSITIONS.items() if (r, c) == (ys.mean() > half, xs.mean() > half)
            ]
            out[name] = (classify(mask), where[0])
    return out


def test_qa_records_format_and_answers_match_the_image(qa):
    records = json.loads(qa.read_text())
    assert len(records) == 12
    kinds = set()
    for rec in records:
        assert set(rec) == {"messages", "images"} and len(rec["images"]) == 1
        msgs = rec["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 2
        assert msgs[0]["content"].startswith("<image>") and "<image>" not in msgs[2]["content"]
        objs = objects_in(np.asarray(Image.open(qa.parent / rec["images"][0])))
        for q, a in zip(msgs[::2], msgs[1::2]):
            q, a = q["content"].removeprefix("<image>"), a["content"]
            if m := re.fullmatch(r"What color is the (\w+)\?", q):
                kinds.add("color")
                assert objs[a][0] == m[1]
            elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
                kinds.add("shape")
                assert objs[m[1]][0] == a
            elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
                kinds.add("position")
                assert objs[m[1]] == (m[2], a)
            else:
                assert q == "How many shapes are in the image?"
                kinds.add("count")
                assert a == ["one", "two", "three"][len(objs) - 1]
    assert kinds == {"color", "shape", "position", "count"}


def leaked_answers(records: list[dict]) -> int:
    """Answers already written in an earlier turn's question or answer of the same record."""
    leaks = 0
    for rec in records:
        said = ""
        for q, a in zip(rec["messages"][::2], rec["messages"][1::2]):
            said += " " + q["content"]
            leaks += f" {a['content']} " in f" {said.rstrip('?')} "
            said += " " + a["content"]
    return leaks


def test_qa_single_turn_records_leak_no_answer(tmp_path):
    """In a conversation later answers can be copied from earlier turns; one-turn records cannot."""
    kw = dict(images=12, size=56, turns=5, seed=1, progress=False)
    conv = json.loads(synth_shapes_qa(tmp_path / "conv", **kw).read_text())
    assert leaked_answers(conv) > 0  # the check can fail
    records = json.loads(synth_shapes_qa(tmp_path / "one", single_turn=True, **kw).read_text())
    assert len(records) == 60 and leaked_answers(records) == 0
    for k, rec in enumerate(records):  # the same questions, each a one-turn record with its image
        src, t = conv[k // 5], 2 * (k % 5)
        assert rec["images"] == src["images"]
        assert rec["messages"][0]["content"] == "<image>" + src["messages"][t]["content"].removeprefix(
            "<image>"
        )
        assert rec["messages"][1] == src["messages"][t + 1]


def test_qa_loads_in_sft_dataset(qa, tmp_path):
    build_tiny_tokenizer(tmp_path / "tok")
    proc = Qwen2_5_VLProcessor.from_pretrained(tmp_path / "tok")
    ds = SFTDataset(str(qa), proc, progress=False)
    assert len(ds) == 12 and not ds.stats
    rec = json.loads(qa.read_text())[0]
    it = ds[0]
    assert it["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112 x 112 -> 8 x 8 patches of 14
    answers = proc.decode(it["input_ids"][it["labels"] != IGNORE_INDEX])
    assert answers == f"{rec['messages'][1]['content']}<|im_end|>{rec['messages'][3]['content']}<|im_end|>"


def test_cli_synth(tmp_path, capsys):
    args = ["--frames", "5", "--height", "16", "--width", "16", "--fps", "8", "--seed", "1", "--quiet"]
    assert main(["data", "synth", "shapes", str(tmp_path / "v"), "--videos", "3", *args]) == 0
    items = json.loads((tmp_path / "v/annotation.json").read_text())
    assert len(items) == 3 and items[0]["num_frames"] == 5 and items[0]["fps"] == 8
    assert (
        main(["data", "synth", "shapes-qa", str(tmp_path / "q"), "--images", "2", "--seed", "1", "--quiet"])
        == 0
    )
    assert len(json.loads((tmp_path / "q/qa.json").read_text())) == 2
    one = ["--images", "2", "--turns", "3", "--single-turn", "--quiet"]
    assert main(["data", "synth", "shapes-qa", str(tmp_path / "s"), *one]) == 0
    assert [len(r["messages"]) for r in json.loads((tmp_path / "s/qa.json").read_text())] == [2] * 6
    assert "data.txt" in capsys.readouterr().out
    assert (
        main(["data", "synth", "shapes", str(tmp_path / "w"), "--videos", "0", "--quiet"]) == 2
    )  # clear error
