"""Corrupt and oversized media: every dataset skips and counts them, empty texts warn, an all-bad set
is one clear error, and Pillow's pixel limit is set explicitly."""

from __future__ import annotations

import json
import logging

import pytest
from data_helpers import make_image, write_bomb_png, write_video
from PIL import Image
from safetensors.torch import save_file

from mmkit.common import MAX_IMAGE_PIXELS
from mmkit.data.features import FeatureDataset
from mmkit.data.sft import SFTDataset
from mmkit.data.video import SampleKey, VideoDataset
from mmkit.models.qwen2_5_vl.processor import Qwen2_5_VLProcessor
from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen_media")
    build_tiny_tokenizer(d, min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    return Qwen2_5_VLProcessor.from_pretrained(d)


def _records(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def _qa(image=None, answer="red"):
    rec = {"messages": [{"role": "user", "content": ("<image>" if image else "") + "Colour?"}]}
    rec["messages"].append({"role": "assistant", "content": answer})
    if image:
        rec["images"] = [image]
    return rec


def test_pillow_limit_is_explicit():
    import mmkit.infer.media  # noqa: F401  (both image readers set it on import)

    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS == 8192 * 8192


def test_sft_bomb_is_skipped_and_counted_and_resume_passes_it(proc, tmp_path):
    # 20000 x 20000 is over twice Pillow's default limit: DecompressionBombError, not an OSError
    write_bomb_png(tmp_path / "bomb.png")
    make_image(40, 40, 0).save(tmp_path / "ok.png")
    ds = SFTDataset(_records(tmp_path / "d.jsonl", [_qa("bomb.png"), _qa("ok.png")]), proc, progress=False)
    assert ds[0] is None and ds.stats["bad_media"] == 1
    item = ds[SampleKey(0, epoch=0, consumed=1)]  # what a resume at the bomb reads: the next sample
    assert item["image_grid_thw"].tolist() == [[1, 4, 4]] and ds.stats["bad_media"] == 2


def test_sft_every_sample_bad_is_one_clear_error(proc, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG junk")
    ds = SFTDataset(_records(tmp_path / "d.jsonl", [_qa("junk.png")]), proc, progress=False)
    with pytest.raises(ValueError, match="none of the 1 samples could be built.*bad_media"):
        ds[SampleKey(0, epoch=0, consumed=1)]


def test_sft_empty_answers_warn_with_a_count(proc, tmp_path, caplog):
    recs = [_qa(answer=" "), _qa(answer=""), _qa(answer="blue")]
    with caplog.at_level(logging.WARNING, logger="mmkit.data.sft"):
        ds = SFTDataset(_records(tmp_path / "d.jsonl", recs), proc, progress=False)
    assert ds.empty_answers == 2 and len(ds) == 3
    assert "2 of 3 records have an empty assistant answer" in caplog.text


def _video_set(tmp_path, clips):
    (tmp_path / "annotation.json").write_text(json.dumps(clips))
    (tmp_path / "data.txt").write_text(f"{tmp_path},{tmp_path / 'annotation.json'}\n")
    return tmp_path / "data.txt"


def test_video_set_all_unreadable_is_one_clear_error(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"not a video")
    (tmp_path / "b.mp4").write_bytes(b"")
    clips = [{"path": p, "cap": "a clip"} for p in ("a.mp4", "b.mp4")]
    ds = VideoDataset(_video_set(tmp_path, clips), 5, 16, 16, progress=False)
    with pytest.raises(ValueError, match=r"none of the 2 samples could be read.*undecodable': 2"):
        ds[0]


def test_video_empty_captions_warn_with_a_count(tmp_path, caplog):
    write_video(tmp_path / "v.mp4", n_frames=12, fps=16)
    clips = [{"path": "v.mp4", "cap": c} for c in ("  ", "a clip", "")]
    with caplog.at_level(logging.WARNING, logger="mmkit.data.video"):
        ds = VideoDataset(_video_set(tmp_path, clips), 5, 16, 16, progress=False)
    assert ds.empty_captions == 2 and len(ds) == 3
    assert "2 of 3 clips have an empty or whitespace caption" in caplog.text


def test_feature_set_damaged_file_is_skipped_and_counted(tmp_path):
    import torch

    (tmp_path / "features").mkdir()
    save_file({"text_context": torch.zeros(1, 4)}, str(tmp_path / "null_text.safetensors"))
    samples = []
    for i in range(2):
        name = f"features/{i:06d}.safetensors"
        save_file(
            {"latents": torch.full((2, 1, 2, 2), float(i)), "text_context": torch.ones(3, 4)},
            str(tmp_path / name),
        )
        samples.append({"file": name, "caption": f"clip {i}"})
    (tmp_path / "index.json").write_text(json.dumps({"task": "t2v", "text_len": 8, "samples": samples}))
    first = tmp_path / samples[0]["file"]
    first.write_bytes(first.read_bytes()[:-5])  # truncated
    ds = FeatureDataset(tmp_path)
    item = ds[SampleKey(0, epoch=0, consumed=1)]
    assert item["caption"] == "clip 1" and float(item["latents"].max()) == 1.0
    assert ds.stats["damaged"] == 1
    first.write_bytes(b"")
    (tmp_path / samples[1]["file"]).write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="none of the 2 samples"):
        FeatureDataset(tmp_path)[0]
