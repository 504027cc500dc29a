"""SFT dataset: token-by-token label masks, M-RoPE positions, truncation, skipped samples, collate."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from data_helpers import make_image, write_video

from mmkit.data.sft import IGNORE_INDEX, SFTCollator, SFTDataset
from mmkit.models.qwen2_5_vl.processor import Qwen2_5_VLProcessor
from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen_sft")
    build_tiny_tokenizer(d, min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    return Qwen2_5_VLProcessor.from_pretrained(d)


@pytest.fixture()
def data_dir(tmp_path):
    make_image(40, 60, 0).save(tmp_path / "a.png")  # -> 56x84 -> grid (1, 4, 6) -> 6 tokens
    make_image(30, 30, 1).save(tmp_path / "b.png")  # -> 56x56 -> grid (1, 4, 4) -> 4 tokens
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    write_video(tmp_path / "v.mp4", n_frames=20, fps=10)  # 50x70 -> 56x56; 4 frames -> grid (2, 4, 4)
    return tmp_path


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def _expected(proc, segments):
    """ids / labels from (text, supervised) segments split at special tokens."""
    ids, labels = [], []
    for text, supervised in segments:
        seg = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg
        labels += seg if supervised else [IGNORE_INDEX] * len(seg)
    return ids, labels


def test_labels_token_by_token_multi_turn_image(proc, data_dir):
    rec = {
        "messages": [
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, it's a cat."},
        ],
        "images": ["a.png"],
    }
    ds = SFTDataset(_write(data_dir / "d.jsonl", [rec]), proc, progress=False)
    item = ds[0]
    img = "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>"
    ids, labels = _expected(
        proc,
        [
            (SYS + "<|im_start|>user\n" + img + "What is it?<|im_end|>\n<|im_start|>assistant\n", False),
            ("A cat.<|im_end|>", True),
            ("\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Yes, it's a cat.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert item["input_ids"].tolist() == ids
    assert item["labels"].tolist() == labels
    sup = item["input_ids"][item["labels"] != IGNORE_INDEX]
    assert proc.decode(sup) == "A cat.<|im_end|>Yes, it's a cat.<|im_end|>"
    assert item["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert item["pixel_values"].shape == (24, 1176)
    assert item["mm_token_type_ids"].tolist() == [int(t == proc.image_token_id) for t in ids]
    assert item["attention_mask"].tolist() == [1] * len(ids)

    # M-RoPE: text 0..s-1, then the 2x3 merged image grid at (s, s+row, s+col), text resumes at s+3
    pos = item["position_ids"]
    s = ids.index(proc.image_token_id)
    assert pos[:, :s].tolist() == [list(range(s))] * 3
    assert pos[:, s : s + 6].tolist() == [[s] * 6, [s, s, s, s + 1, s + 1, s + 1], [s, s + 1, s + 2] * 2]
    assert pos[:, s + 6].tolist() == [s + 3] * 3
    assert pos[0, -1].item() == len(ids) - 1 - 6 + 3


def test_system_message_list_content_and_two_images(proc, data_dir):
    tagged = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image><image>Same?"},
            {"role": "assistant", "content": "No."},
        ],
        "images": ["a.png", "b.png"],
    }
    parts = dict(tagged)
    parts["messages"] = [
        tagged["messages"][0],
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}],
        },
        tagged["messages"][2],
    ]
    ds = SFTDataset(_write(data_dir / "d.jsonl", [tagged, parts]), proc, progress=False)
    a, b = ds[0], ds[1]
    blk = lambda n: "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"  # noqa: E731
    ids, labels = _expected(
        proc,
        [
            ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + blk(6) + blk(4), False),
            ("Same?<|im_end|>\n<|im_start|>assistant\n", False),
            ("No.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert a["input_ids"].tolist() == ids and a["labels"].tolist() == labels
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4]]
    assert a["pixel_values"].shape == (24 + 16, 1176)


def test_video_item(proc, data_dir):
    rec = {
        "messages": [
            {"role": "user", "content": "<video>What happens?"},
            {"role": "assistant", "content": "Runs."},
        ],
        "videos": [str(data_dir / "v.mp4")],  # absolute path
    }
    ds = SFTDataset(_write(data_dir / "d.jsonl", [rec]), proc, progress=False, tokens_per_second=2.0)
    item = ds[0]
    assert item["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert item["second_per_grid_ts"].tolist() == [1.0]  # 4 of 20 frames at 10 fps -> 2 fps -> 2 / 2
    assert item["pixel_values_videos"].shape == (32, 1176)
    ids = item["input_ids"].tolist()
    assert ids.count(proc.video_token_id) == 8 and (item["mm_token_type_ids"] == 2).sum() == 8
    # time axis: grid step k sits at s + k * 1.0 s * 2 tokens/s
    s = ids.index(proc.video_token_id)
    assert item["position_ids"][0, s : s + 8].tolist() == [s] * 4 + [s + 2] * 4
    assert item["position_ids"][:, s + 8].tolist() == [s + 3] * 3  # max(t=2, h=1, w=1) + 1


def _long_record(n_words, image_first=True):
    text = " ".join(["word"] * n_words)
    user = "<image>" + text if image_first else text + "<image>"
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}],
        "images": ["a.png"],
    }


def test_cutoff_truncates_text_but_never_a_vision_block(proc, data_dir, caplog):
    files = _write(
        data_dir / "d.jsonl", [_long_record(30), _long_record(30, image_first=False), _long_record(2)]
    )
    ds = SFTDataset(files, proc, cutoff_len=60, progress=False)
    full = SFTDataset(files, proc, cutoff_len=10_000, progress=False)
    assert len(full[0]["input_ids"]) > 60 and len(full[2]["input_ids"]) <= 60

    # image first, long text after: cut the text; the answer is gone -> nothing to learn -> dropped
    with caplog.at_level(logging.WARNING, logger="mmkit.data.sft"):
        assert ds[0] is None
    assert ds.stats["no_target"] == 1 and "no_target" in caplog.text

    # image at the end of a long prompt: the cut would go through the image -> dropped, counted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmkit.data.sft"):
        assert ds[1] is None
    assert ds.stats["too_long"] == 1 and "cuts a vision block" in caplog.text and "d.jsonl:1" in caplog.text

    # a cutoff that lands in text after the image and keeps part of the answer: truncated, not dropped
    n = len(full[2]["input_ids"])
    short = SFTDataset(files, proc, cutoff_len=n - 2, progress=False)[2]  # drops "<|im_end|>", "\n"
    assert short["input_ids"].tolist() == full[2]["input_ids"][: n - 2].tolist()
    assert short["labels"].tolist() == full[2]["labels"][: n - 2].tolist()
    assert torch.equal(short["position_ids"], full[2]["position_ids"][:, : n - 2])
    assert proc.decode(short["input_ids"][short["labels"] != IGNORE_INDEX]) == "ok"


def test_missing_and_corrupt_media_are_skipped_and_counted(proc, data_dir, caplog):
    good = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}]}
    recs = [
        dict(good, images=["a.png"]),
        dict(good, images=["nope.png"]),  # missing -> skipped at load
        dict(good, images=["corrupt.png"]),  # undecodable -> None at build
        {"messages": [{"role": "user", "content": "<image>Q"}]},  # malformed (no image path, no reply)
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "<|image_pad|>?"}, {"role": "assistant", "content": "A"}]},
    ]
    with caplog.at_level(logging.WARNING, logger="mmkit.data.sft"):
        ds = SFTDataset(_write(data_dir / "d.jsonl", recs), proc, progress=False)
    assert len(ds) == 3
    assert ds.stats["missing_media"] == 1 and ds.stats["malformed"] == 2
    assert "raw vision token" in caplog.text
    assert "nope.png not found" in caplog.text and "d.jsonl:1" in caplog.text and "d.jsonl:3" in caplog.text
    items = [ds[i] for i in range(len(ds))]
    assert items[1] is None and ds.stats["bad_media"] == 1
    batch = SFTCollator(ds.pad_token_id)(items)
    assert batch["input_ids"].shape[0] == 2  # the None item is dropped
    assert SFTCollator(ds.pad_token_id)([None]) is None


def test_files_comma_list_max_samples_and_media_root(proc, data_dir, tmp_path_factory):
    rec = lambda q: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "a"}]}  # noqa: E731
    f1 = _write(data_dir / "one.jsonl", [rec("q0"), rec("q1")])
    f2 = data_dir / "two.json"
    f2.write_text(json.dumps([rec("q2"), rec("q3")]))
    ds = SFTDataset(f"{f1},{f2}", proc, max_samples=3, progress=False)
    assert [s[0].rsplit("/", 1)[-1] for s in ds.samples] == ["one.jsonl:0", "one.jsonl:1", "two.json:0"]
    assert len(SFTDataset([f1, str(f2)], proc, progress=False)) == 4

    other = tmp_path_factory.mktemp("elsewhere")
    img_rec = {
        "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
        "images": ["a.png"],
    }
    f3 = _write(other / "three.jsonl", [img_rec])
    assert len(SFTDataset(f3, proc, progress=False)) == 0  # a.png is not next to three.jsonl
    assert len(SFTDataset(f3, proc, media_root=data_dir, progress=False)) == 1
    with pytest.raises(ValueError, match="cutoff_len"):
        SFTDataset(f3, proc, cutoff_len=0)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        SFTDataset(str(data_dir / "absent.jsonl"), proc)


def test_collate_pads_and_concatenates(proc, data_dir):
    recs = [
        {
            "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
            "images": ["a.png"],
        },
        {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]},
        {
            "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "B"}],
            "images": ["b.png"],
        },
    ]
    ds = SFTDataset(_write(data_dir / "d.jsonl", recs), proc, progress=False)
    items = [ds[i] for i in range(3)]
    lens = [len(it["input_ids"]) for it in items]
    batch = SFTCollator(ds.pad_token_id, pad_to_multiple_of=8)(items)
    L = batch["input_ids"].shape[1]
    assert L % 8 == 0 and L >= max(lens) and L - max(lens) < 8
    assert batch["position_ids"].shape == (3, 3, L)
    for b, (it, n) in enumerate(zip(items, lens)):
        assert torch.equal(batch["input_ids"][b, :n], it["input_ids"])
        assert (batch["input_ids"][b, n:] == ds.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][b, n:] == 0).all()
        assert torch.equal(batch["position_ids"][:, b, :n], it["position_ids"])
        assert (batch["position_ids"][:, b, n:] == 0).all()
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4]]
    left = SFTCollator(ds.pad_token_id, padding_side="left")(items)
    n = lens[1]
    assert torch.equal(left["input_ids"][1, -n:], items[1]["input_ids"])
    assert (left["attention_mask"][1, : left["input_ids"].shape[1] - n] == 0).all()
