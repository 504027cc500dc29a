"""Processor parity: mmkit's Qwen2.5-VL processor vs transformers (Pillow backend) on a tiny local folder.

transformers' Qwen2VLVideoProcessor needs torchvision (not importable here), so transformers' full
Qwen2_5_VLProcessor is built with the video slot left empty (`_TfProcessor` below) and videos are
checked frame by frame against transformers' PyAV loader and its image processor.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from data_helpers import make_image, write_video
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor as HFProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.video_utils import load_video as hf_load_video

from mmkit.models.qwen2_5_vl.processor import (
    Qwen2_5_VLProcessor,
    check_placeholders,
    load_video,
    sample_frame_indices,
    smart_resize,
)
from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 30


class _TfProcessor(HFProcessor):
    """transformers' processor without its torchvision-only video processor (images + text only)."""

    def check_argument_for_proper_class(self, name, arg):
        return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen_proc")
    build_tiny_tokenizer(d, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return d


@pytest.fixture(scope="module")
def procs(folder):
    ours = Qwen2_5_VLProcessor.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ref = _TfProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=tok,
        video_processor=None,
        chat_template=tok.chat_template,
    )
    return ours, ref


ODD_SIZES = [(61, 93), (13, 201), (300, 217), (20, 30), (57, 57), (111, 29), (29, 5000 // 29)]


def test_smart_resize_matches_transformers():
    for h in range(5, 400, 17):
        for w in range(3, 400, 23):
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in ((MIN_PIXELS, MAX_PIXELS), (3136, 12845056), (28 * 28 * 4, 28 * 28 * 4)):
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(2, 500)


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_image_pixels_match_transformers(procs, size, mode):
    ours, ref = procs
    img = make_image(*size, seed=size[0] * 1000 + size[1], mode=mode)
    want = ref.image_processor(images=[img], return_tensors="pt")
    got = ours(ours.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}]), images=[img])
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    assert got["pixel_values"].dtype == torch.float32
    assert got["pixel_values"].shape == want["pixel_values"].shape
    # bit-exact: same Pillow resize, same float64 rescale, same float32 normalise
    assert (got["pixel_values"] - want["pixel_values"]).abs().max().item() == 0.0


def test_batch_matches_transformers_processor(procs):
    ours, ref = procs
    imgs = [make_image(61, 93, 1), make_image(300, 217, 2), make_image(20, 30, 3)]
    conv_a = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}],
        },
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
    ]
    conv_b = [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]}]
    texts = [ours.apply_chat_template(conv_a), ours.apply_chat_template(conv_b)]
    assert texts == [ref.apply_chat_template(c, add_generation_prompt=True) for c in (conv_a, conv_b)]
    for side in ("left", "right"):
        got = ours(texts, images=imgs, padding_side=side)
        want = ref(text=texts, images=imgs, padding=True, padding_side=side, return_tensors="pt")
        assert set(got) == set(want), (set(got), set(want))
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert torch.equal(got[key], want[key]), key
    # left padding puts the pad tokens first and mask zeros there
    got = ours(texts, images=imgs, padding_side="left")
    n_pad = int((got["attention_mask"][1] == 0).sum())
    assert n_pad > 0 and got["attention_mask"][1, :n_pad].sum() == 0
    assert (got["input_ids"][1, :n_pad] == ours.pad_token_id).all()
    # each image's placeholder block has t*h*w/4 tokens, typed 1
    assert int((got["mm_token_type_ids"] == 1).sum()) == int(got["image_grid_thw"].prod(-1).sum()) // 4
    assert ours.batch_decode(got["input_ids"], skip_special_tokens=True) == ref.batch_decode(
        want["input_ids"], skip_special_tokens=True
    )


def test_text_only_matches_transformers(procs):
    ours, ref = procs
    texts = [ours.apply_chat_template([{"role": "user", "content": "Hello world! It's a sunny day."}])]
    got, want = ours(texts), ref(text=texts, return_tensors="pt")
    assert set(got) == set(want) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_frame_sampling_rule():
    # n = total / video_fps * fps, clamped to [min_frames, total], floored to even; evenly spread
    assert sample_frame_indices(20, 10.0, fps=2.0) == [0, 5, 10, 15]  # 4 frames (min_frames)
    assert sample_frame_indices(20, 10.0, fps=4.0) == [0, 2, 5, 7, 10, 12, 15, 17]
    assert sample_frame_indices(20, 10.0, fps=4.0, max_frames=5) == [0, 5, 10, 15]
    assert sample_frame_indices(31, 30.0, fps=1.0) == [0, 7, 15, 23]
    assert sample_frame_indices(3, 30.0, fps=2.0) == [0, 1]  # capped at 2 = floor(3 / 2) * 2
    assert sample_frame_indices(1, 30.0, fps=2.0) == [0]  # shorter than one temporal patch: keep all


@pytest.mark.parametrize("fps,max_frames", [(2.0, 768), (4.0, 768), (4.0, 6)])
def test_video_matches_transformers_frames(procs, folder, tmp_path, fps, max_frames):
    _, ref = procs
    path = tmp_path / "clip.mp4"
    write_video(path)
    vid = load_video(path, fps=fps, max_frames=max_frames)
    expect = sample_frame_indices(20, 10.0, fps=fps, max_frames=max_frames)
    assert vid.indices == expect and len(expect) % 2 == 0

    # decoded frames and sampled fps: identical to transformers' PyAV loader given the same indices
    frames, meta = hf_load_video(str(path), backend="pyav", sample_indices_fn=lambda metadata, **kw: expect)
    assert np.array_equal(vid.frames, frames)
    assert vid.sampled_fps == pytest.approx(meta.sampled_fps, rel=1e-12)

    ours = Qwen2_5_VLProcessor.from_pretrained(folder, fps=fps, max_frames=max_frames)
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    got = ours(ours.apply_chat_template(conv), videos=[str(path)])
    gt, gh, gw = got["video_grid_thw"][0].tolist()
    assert gt == len(expect) // 2
    assert got["second_per_grid_ts"].tolist() == pytest.approx([2 / meta.sampled_fps])
    assert int((got["mm_token_type_ids"] == 2).sum()) == gt * gh * gw // 4
    assert int((got["input_ids"] == ours.video_token_id).sum()) == gt * gh * gw // 4

    # pixels: every frame equals transformers' image processor on that frame, in the (C, T, p, p) slot
    rows = got["pixel_values_videos"].view(gt, gh * gw, 3, 2, 14, 14)
    for k in range(gt):
        for t in range(2):
            want = ref.image_processor(images=[Image.fromarray(frames[2 * k + t])], return_tensors="pt")
            assert want["image_grid_thw"].tolist() == [[1, gh, gw]]
            ref_rows = want["pixel_values"].view(gh * gw, 3, 2, 14, 14)[:, :, 0]
            assert (rows[k, :, :, t] - ref_rows).abs().max().item() == 0.0


def test_video_and_image_in_one_batch(procs, tmp_path):
    ours, _ = procs
    path = tmp_path / "clip.mp4"
    write_video(path, n_frames=9, fps=3)  # 3 s at 3 fps -> 6 frames at fps 2 -> grid_t 3
    img = make_image(40, 40, 5)
    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}]}
    ]
    out = ours(
        [ours.apply_chat_template(conv), ours.apply_chat_template([{"role": "user", "content": "hi"}])],
        images=[img],
        videos=[path],
    )
    assert set(out) == {
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    }
    assert out["video_grid_thw"][0, 0].item() == 3
    assert out["second_per_grid_ts"].tolist() == pytest.approx([1.0])
    assert out["pixel_values_videos"].shape == (int(out["video_grid_thw"].prod()), 1176)
    # row 1 (text only) is left padded; its type ids are all 0
    assert out["mm_token_type_ids"][1].sum() == 0 and out["attention_mask"][1, 0] == 0
    check_placeholders(
        out["input_ids"],
        ours.image_token_id,
        ours.video_token_id,
        out["image_grid_thw"],
        out["video_grid_thw"],
    )


def test_mismatched_placeholders_name_the_sample(procs):
    ours, _ = procs
    one = ours.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}]
    )
    two = ours.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}])
    img = make_image(30, 30, 0)
    with pytest.raises(ValueError, match=r"sample 1: .*3 <\|image_pad\|> placeholder.*2 image"):
        ours([one, two], images=[img, img])
    with pytest.raises(ValueError, match=r"sample 0: .*1 <\|image_pad\|> placeholder.*2 image"):
        ours([one], images=[img, img])
    out = ours([one], images=[img])
    ids = out["input_ids"][0]
    cut = ids[ids != ours.image_token_id][:-1]  # drop the image tokens: features no longer match
    with pytest.raises(ValueError, match="item 7: 0 image placeholder tokens but 1 image"):
        check_placeholders(
            cut, ours.image_token_id, ours.video_token_id, out["image_grid_thw"], name="item 7"
        )


def test_missing_and_bad_files(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Qwen2_5_VLProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="bad.mp4 could not be decoded"):
        load_video(bad)
    with pytest.raises(ValueError, match="min_pixels"):
        Qwen2_5_VLProcessor.from_pretrained(folder, min_pixels=10_000, max_pixels=5_000)


def test_video_without_frame_count(tmp_path):
    # Matroska headers carry no frame count: frames are counted by decoding, then sampled the same way
    write_video(tmp_path / "a.mkv")
    with av.open(str(tmp_path / "a.mkv")) as c:
        assert c.streams.video[0].frames == 0
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    vid = load_video(tmp_path / "a.mkv", fps=4.0)
    assert len(every) == 20 and vid.indices == [0, 2, 5, 7, 10, 12, 15, 17]
    assert vid.sampled_fps == 4.0
    assert np.array_equal(vid.frames, np.stack([every[i] for i in vid.indices]))
