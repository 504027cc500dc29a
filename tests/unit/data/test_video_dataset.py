"""MindSpeed-format video dataset: temporal resampling, resize + crop, skips, sources, resumable order."""

from __future__ import annotations

import json
import logging

import av
import numpy as np
import pytest
import torch

from mmkit.data.video import (
    ResumableSampler,
    SampleKey,
    VideoDataset,
    collate_videos,
    frame_indices,
    resize_center_crop,
)
from mmkit.infer.media import save_video

STEP = 8  # grey level per frame index in the index-encoded videos


def index_video(path, n: int, fps: float, h: int = 16, w: int = 16):
    """A video whose frame i is flat grey STEP * i, so a decoded frame tells its source index.

    .mp4 via save_video; .mkv (whose header has no frame count) with PyAV directly."""
    frames = np.stack([np.full((h, w, 3), STEP * i / 255, np.float32) for i in range(n)])
    if str(path).endswith(".mp4"):
        save_video(frames, path, fps=fps)
        return
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in np.round(frames * 255).astype(np.uint8):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def decoded_indices(video: torch.Tensor) -> list[int]:
    """(3, T, H, W) in [-1, 1] -> the source frame index of each frame."""
    grey = (video.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [round(float(g) / STEP) for g in grey]


def write_source(root, items, name="annotation.json"):
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(items))
    return root / name


def item(path, n, fps, cap="a clip", h=16, w=16):
    return {"path": path, "cap": cap, "num_frames": n, "fps": fps, "resolution": {"height": h, "width": w}}


def data_txt(tmp_path, *lines):
    p = tmp_path / "data.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture()
def index_set(tmp_path):
    """Clips of 30 frames at 24 and 32 fps, frame index in the pixels."""
    root = tmp_path / "v"
    root.mkdir()
    index_video(root / "a24.mp4", 30, 24)
    index_video(root / "b32.mp4", 30, 32)
    ann = write_source(root, [item("a24.mp4", 30, 24), item("b32.mp4", 30, 32)])
    return data_txt(tmp_path, f"{root},{ann}")


def test_frame_indices_match_mindspeed_rule():
    assert frame_indices(10, fps=24, train_fps=16).tolist() == [0, 1, 3, 4, 6, 7, 9]
    assert frame_indices(10, fps=32, train_fps=16).tolist() == [0, 2, 4, 6, 8]
    assert frame_indices(5, fps=16.05, train_fps=16).tolist() == [0, 1, 2, 3, 4]  # |diff| < 0.1: step 1
    assert frame_indices(3, fps=8, train_fps=16).tolist() == [0, 0, 1, 1, 2, 2]  # lower rate repeats


def test_frames_sampled_at_train_fps(index_set):
    ds = VideoDataset(
        index_set, num_frames=5, height=16, width=16, train_fps=16, random_start=False, progress=False
    )
    assert decoded_indices(ds[0]["video"]) == [0, 1, 3, 4, 6]  # 24 fps -> 16: step 1.5
    assert decoded_indices(ds[1]["video"]) == [0, 2, 4, 6, 8]  # 32 fps -> 16: step 2


def test_frame_count_unknown_everywhere_is_counted_from_packets(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    index_video(root / "a.mkv", 30, 32)
    with av.open(str(root / "a.mkv")) as c:
        assert c.streams.video[0].frames == 0  # nothing in the header
    ann = write_source(root, [{"path": "a.mkv", "cap": "no counts"}])  # nor in the annotation
    ds = VideoDataset(
        data_txt(tmp_path, f"{root},{ann}"),
        num_frames=9,
        height=16,
        width=16,
        train_fps=16,
        seed=4,
        progress=False,
    )
    got = decoded_indices(ds[0]["video"])
    assert got == list(range(got[0], got[0] + 18, 2)) and got[0] % 2 == 0 and got[-1] <= 29
    # 30 frames at 32 fps -> 15 at 16 fps < 17: found when read; with no other sample, a clear error
    with pytest.raises(
        ValueError, match=r"none of the 1 samples could be read \(skipped: \{'too_short': 1\}"
    ):
        VideoDataset(data_txt(tmp_path, f"{root},{ann}"), num_frames=17, progress=False)[0]


def test_random_start_is_a_window_of_the_resampled_indices_and_deterministic(index_set):
    ds = VideoDataset(index_set, num_frames=5, height=16, width=16, train_fps=16, seed=3, progress=False)
    full = frame_indices(30, 24, 16).tolist()  # 20 indices -> starts 0..15
    starts = set()
    for epoch in range(6):
        got = decoded_indices(ds[SampleKey(0, epoch, 1)]["video"])
        begin = full.index(got[0])
        assert got == full[begin : begin + 5]
        starts.add(begin)
        again = decoded_indices(ds[SampleKey(0, epoch, 1)]["video"])
        assert again == got  # same (seed, epoch, index): same window
    assert len(starts) > 1  # the start really varies with the epoch


def test_resize_center_crop_exact_and_shape():
    x = torch.arange(24.0).reshape(1, 1, 4, 6)
    assert torch.equal(resize_center_crop(x, 4, 4), x[..., :, 1:5])  # no resize, centre columns
    assert resize_center_crop(torch.rand(3, 3, 40, 80), 32, 32).shape == (3, 3, 32, 32)
    assert resize_center_crop(torch.rand(3, 3, 90, 40), 48, 32).shape == (3, 3, 48, 32)


def test_resize_keeps_aspect_then_crops_centre(tmp_path):
    # 40 x 80 frame: green | red (middle half) | blue. Scaled to 32 x 64, the centre 32 columns are red.
    frame = np.zeros((40, 80, 3), np.float32)
    frame[:, :20] = (0, 1, 0)
    frame[:, 20:60] = (1, 0, 0)
    frame[:, 60:] = (0, 0, 1)
    root = tmp_path / "v"
    save_video(np.stack([frame] * 5), root / "wide.mp4", fps=16)
    ann = write_source(root, [item("wide.mp4", 5, 16, h=40, w=80)])
    ds = VideoDataset(data_txt(tmp_path, f"{root},{ann}"), num_frames=5, height=32, width=32, progress=False)
    v = ds[0]["video"]
    assert v.shape == (3, 5, 32, 32) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    inner = v[:, :, 2:-2, 2:-2].mean(dim=(1, 2, 3))  # away from chroma-subsampled edges
    torch.testing.assert_close(inner, torch.tensor([1.0, -1.0, -1.0]), atol=0.08, rtol=0)


@pytest.mark.parametrize("bad", [16, 0, 18, 4])
def test_num_frames_must_be_4k_plus_1(index_set, bad):
    with pytest.raises(ValueError, match=r"num_frames=.*4k\+1"):
        VideoDataset(index_set, num_frames=bad, progress=False)


def test_max_samples_keeps_the_first_n(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    index_video(root / "a.mp4", 5, 16)
    ann = write_source(root, [item("a.mp4", 5, 16, cap=f"clip {i}") for i in range(5)])
    ds = VideoDataset(data_txt(tmp_path, f"{root},{ann}"), num_frames=5, max_samples=3, progress=False)
    assert len(ds) == 3
    assert [ds[i]["caption"] for i in range(3)] == ["clip 0", "clip 1", "clip 2"]


@pytest.fixture()
def broken_set(tmp_path):
    """good0, missing, corrupt (garbage bytes), good3, empty file, malformed entry, too short by annotation."""
    root = tmp_path / "v"
    root.mkdir()
    for name in ("good0", "good3"):
        index_video(root / f"{name}.mp4", 5, 16)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    (root / "empty.mp4").write_bytes(b"")
    items = [
        item("good0.mp4", 5, 16, cap="good0"),
        item("missing.mp4", 5, 16, cap="missing"),
        item("corrupt.mp4", 5, 16, cap="corrupt"),
        item("good3.mp4", 5, 16, cap="good3"),
        item("empty.mp4", 5, 16, cap="empty"),
        {"cap": "no path"},
        item("good0.mp4", 3, 16, cap="short"),
    ]
    ann = write_source(root, items)
    return data_txt(tmp_path, f"{root},{ann}")


def test_missing_and_corrupt_files_skipped_counted_reported(broken_set, caplog):
    with caplog.at_level(logging.WARNING, logger="mmkit.data.video"):
        ds = VideoDataset(broken_set, num_frames=5, height=16, width=16, progress=False)
    assert len(ds) == 5  # malformed and too-short entries dropped at build time
    assert dict(ds.stats) == {"malformed": 1, "too_short": 1}
    loader = torch.utils.data.DataLoader(
        ds, batch_size=5, sampler=ResumableSampler(len(ds), shuffle=False), collate_fn=collate_videos
    )
    batch = next(iter(loader))
    # each bad file is replaced by the next good sample, so the batch keeps its size
    assert batch["video"].shape == (5, 3, 5, 16, 16)
    assert batch["caption"] == ["good0", "good3", "good3", "good3", "good0"]
    assert batch["index"].tolist() == [0, 3, 3, 3, 0]
    assert sorted(r["reason"] for r in batch["skipped"]) == ["missing", "undecodable", "undecodable"]
    assert dict(ds.stats) == {"malformed": 1, "too_short": 1, "missing": 1, "undecodable": 2}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmkit.data.video"):
        rep = ds.report()
    assert rep["samples"] == 5
    assert rep["skipped"] == {"malformed": 1, "too_short": 1, "missing": 1, "undecodable": 2}
    assert {p.rsplit("/", 1)[-1]: r for p, r in rep["examples"].items()} == {
        "missing.mp4": "missing",
        "corrupt.mp4": "undecodable",
        "empty.mp4": "undecodable",
    }
    assert "skipped 5" in caplog.text and "missing: 1" in caplog.text
    # a second epoch does not count the same files again
    next(iter(loader))
    assert ds.report()["skipped"]["undecodable"] == 2


def test_skips_found_in_workers_reach_the_main_process(broken_set):
    ds = VideoDataset(broken_set, num_frames=5, height=16, width=16, progress=False)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=5,
        sampler=ResumableSampler(len(ds), shuffle=False),
        collate_fn=collate_videos,
        num_workers=1,
    )
    batch = next(iter(loader))
    assert "missing" not in ds.stats  # counted in the worker's copy only
    ds.record_skips(batch)
    ds.record_skips(batch)  # idempotent: each file once
    assert ds.stats["missing"] == 1 and ds.stats["undecodable"] == 2


def test_header_shorter_than_needed_is_too_short(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    index_video(root / "short.mp4", 3, 16)
    index_video(root / "ok.mp4", 5, 16)
    ann = write_source(
        root, [{"path": "short.mp4", "cap": "s"}, {"path": "ok.mp4", "cap": "ok"}]
    )  # no counts
    ds = VideoDataset(data_txt(tmp_path, f"{root},{ann}"), num_frames=5, progress=False)
    assert ds[0]["caption"] == "ok"
    assert dict(ds.stats) == {"too_short": 1}


def test_multi_source_data_txt_with_relative_paths(tmp_path):
    for src, n in (("s1", 2), ("s2", 3)):
        root = tmp_path / src / "clips"
        root.mkdir(parents=True)
        index_video(root / "x.mp4", 5, 16)
        write_source(
            tmp_path / src, [item("x.mp4", 5, 16, cap=f"{src}-{i}") for i in range(n)], name="ann.json"
        )
    txt = data_txt(tmp_path, "# two sources", "s1/clips,s1/ann.json", "", "s2/clips,s2/ann.json")
    ds = VideoDataset(txt, num_frames=5, progress=False)
    assert [ds[i]["caption"] for i in range(len(ds))] == ["s1-0", "s1-1", "s2-0", "s2-1", "s2-2"]
    assert ds[0]["path"] == str(tmp_path / "s1/clips/x.mp4")
    assert ds[4]["path"] == str(tmp_path / "s2/clips/x.mp4")
    # several data.txt files (config `data.paths`): their sources in order
    (tmp_path / "two.txt").write_text(f"{tmp_path / 's1/clips'},{tmp_path / 's1/ann.json'}\n")
    ds2 = VideoDataset([tmp_path / "two.txt", txt], num_frames=5, max_samples=4, progress=False)
    assert [ds2[i]["caption"] for i in range(len(ds2))] == ["s1-0", "s1-1", "s1-0", "s1-1"]


def test_bad_data_txt_errors_name_the_line_or_file(tmp_path):
    with pytest.raises(ValueError, match=r"data.txt:1: expected `<video_root>,<annotation.json>`"):
        VideoDataset(data_txt(tmp_path, "just_a_folder"), progress=False)
    (tmp_path / "v").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data.txt:1: annotation file .*nope.json not found"):
        VideoDataset(data_txt(tmp_path, "v,nope.json"), progress=False)
    with pytest.raises(FileNotFoundError, match="data.txt not found"):
        VideoDataset(tmp_path / "absent.txt", progress=False)
    index_video(tmp_path / "v/a.mp4", 5, 16)
    ann = write_source(tmp_path / "v", [item("a.mp4", 5, 16)])
    with pytest.raises(ValueError, match=r"no usable clips .*'too_short': 1.*lower num_frames=9"):
        VideoDataset(data_txt(tmp_path, f"v,{ann}"), num_frames=9, progress=False)


def _run(ds, sampler, batches, batch_size=2):
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=sampler, collate_fn=collate_videos
    )
    out = []
    for _ in range(batches):
        for batch in loader:
            out.append(batch)
            if len(out) == batches:
                return out
    return out


@pytest.fixture()
def order_set(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    index_video(root / "a.mp4", 30, 24)
    ann = write_source(root, [item("a.mp4", 30, 24, cap=f"c{i}") for i in range(7)])
    return VideoDataset(
        data_txt(tmp_path, f"{root},{ann}"), num_frames=5, train_fps=16, seed=1, progress=False
    )


def test_order_is_deterministic_per_seed_and_epoch(order_set):
    s = ResumableSampler(7, seed=5)
    e0, e1 = [k.index for k in s], [k.index for k in s]  # reading to the end moves on to the next epoch
    assert sorted(e0) == sorted(e1) == list(range(7)) and e0 != e1
    assert [k.index for k in ResumableSampler(7, seed=5)] == e0
    assert [k.index for k in ResumableSampler(7, seed=6)] != e0
    assert [k.consumed for k in ResumableSampler(7, seed=5)] == [1, 2, 3, 4, 5, 6, 7]


def test_resume_mid_epoch_continues_identically(order_set):
    ds = order_set
    ref = _run(ds, ResumableSampler(len(ds), seed=2), batches=6)  # 4 batches per epoch: 2, 2, 2, 1
    part = _run(ds, ResumableSampler(len(ds), seed=2), batches=2)
    state = part[-1]["data_state"]
    assert state == {"epoch": 0, "consumed": 4}
    resumed = ResumableSampler(len(ds), seed=2)
    resumed.load_state_dict(state)
    rest = _run(ds, resumed, batches=4)
    for a, b in zip(ref[2:], rest):
        assert a["index"].tolist() == b["index"].tolist()
        assert torch.equal(a["video"], b["video"])  # same temporal windows too
        assert a["data_state"] == b["data_state"]


def test_resume_at_epoch_end_and_on_another_world_size():
    s = ResumableSampler(8, seed=0)
    s.load_state_dict({"epoch": 0, "consumed": 8})
    assert s.state_dict() == {"seed": 0, "epoch": 1, "consumed": 0, "num_samples": 8}
    order = ResumableSampler(8, seed=0).order(0).tolist()
    ranks = [list(ResumableSampler(8, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert sorted(k.index for keys in ranks for k in keys) == list(range(8))
    assert [k.index for k in ranks[1]] == order[1::2]
    state = {"epoch": 0, "consumed": ranks[0][1].consumed}  # both ranks read 2 samples: 4 in all
    assert state["consumed"] == 4
    single = ResumableSampler(8, seed=0)
    single.load_state_dict(state)
    assert [k.index for k in single] == order[4:]
    three = ResumableSampler(8, seed=0, world_size=3)
    with pytest.raises(ValueError, match="does not divide by world_size=3"):
        three.load_state_dict(state)
