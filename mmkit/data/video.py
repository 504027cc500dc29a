"""Text/image-to-video training data in the MindSpeed-MM / OpenSoraPlan layout -> (C, T, H, W) clips.

`data.txt`: one source per line, `<video_root>,<annotation.json>` (blank lines and `#` comments ignored).
Relative paths are looked up next to data.txt first, then in the current directory.
Annotation file: a JSON list (or JSONL) of
    {"path": "clips/a.mp4", "cap": "a red circle moves left", "num_frames": 81, "fps": 24,
     "resolution": {"height": 480, "width": 832}}
with `path` relative to that line's video_root; `cap` may be a list of captions (one is picked per
epoch). `num_frames` / `fps` let short clips be dropped before any decoding.

Sampling follows MindSpeed: the frame step is file_fps / train_fps (1 when they differ by < 0.1), the
indices are `arange(0, total, step).astype(int)`, and a longer clip is cut to `num_frames` at a start
drawn from (seed, epoch, index). Frames are resized (aspect kept) to cover height x width, then
centre-cropped. An item is {"video": float (3, T, H, W) in [-1, 1], "caption": str, ...}.

Bad samples never stop a run. Malformed annotation entries and clips too short for `num_frames` are
dropped when the dataset is built; a missing or undecodable file is found when it is read, and the
next index stands in for it (so batches keep their size). Every skip is counted once per file in
`dataset.stats` and summarised by `dataset.report()`.

Resuming: `ResumableSampler` gives a fixed order per (seed, epoch); each batch carries
`batch["data_state"]`, the position to save with a checkpoint and restore with
`sampler.load_state_dict(state)`. Precomputed VAE/text features are not handled here.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

logger = logging.getLogger(__name__)

SKIP_REASONS = ("malformed", "too_short", "missing", "undecodable")
_MAX_DETAIL_WARNINGS = 5  # per reason; later skips are only counted (a broken source can hold millions)


class SampleKey(NamedTuple):
    """What `ResumableSampler` yields: a dataset index plus the data position reached after it.

    `consumed` is the number of samples of `epoch`, over all ranks, that are used once this sample and
    the ones other ranks read beside it are used. `dataset[SampleKey(...)]` works like `dataset[index]`.
    """

    index: int
    epoch: int
    consumed: int


@dataclass(frozen=True)
class _Clip:
    path: str  # video file (root already joined)
    caption: str | tuple[str, ...]
    num_frames: int | None  # from the annotation; None = unknown
    fps: float | None


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def check_num_frames(num_frames: int) -> None:
    """Raise a clear ValueError unless `num_frames` is 4k+1 (1, 5, 9, ..., 17, ..., 81).

    Wan / OpenSoraPlan VAEs keep the first frame and compress the rest 4x in time, so a clip of T
    frames has (T - 1) / 4 + 1 latent frames. Example: `check_num_frames(17)`.
    """
    if not isinstance(num_frames, int) or num_frames < 1 or num_frames % 4 != 1:
        lo = max(1, (num_frames - 1) // 4 * 4 + 1) if isinstance(num_frames, int) and num_frames > 0 else 1
        raise ValueError(
            f"num_frames={num_frames!r} must be 4k+1 (1, 5, 9, 13, 17, ..., 81): the video VAE keeps the "
            f"first frame and compresses the rest 4x in time; use {lo} or {lo + 4}."
        )


def frame_indices(total: int, fps: float, train_fps: float, start: int = 0) -> np.ndarray:
    """Indices of the frames of a `total`-frame clip at `fps` that resample it to `train_fps`.

    MindSpeed's rule: step = fps / train_fps (1 when the rates differ by < 0.1), indices
    `arange(start, start + total, step)` truncated to int. A lower file rate repeats frames.
    Example: `frame_indices(10, fps=24, train_fps=16)  # [0 1 3 4 6 7 9]`.
    """
    step = 1.0 if abs(fps - train_fps) < 0.1 else fps / train_fps
    idx = np.arange(start, start + total, step).astype(np.int64)
    return idx[idx < start + total]


def read_data_txt(data_txt: str | os.PathLike) -> list[tuple[Path, Path]]:
    """The (video_root, annotation file) pairs of a MindSpeed `data.txt`, checked to exist.

    Example: `read_data_txt("data/shapes/data.txt")  # [(Path('data/shapes'), Path('.../annotation.json'))]`.
    """
    data_txt = Path(data_txt)
    if not data_txt.is_file():
        raise FileNotFoundError(
            f"data.txt not found: {data_txt}; write one line `<video_root>,<annotation.json>` per source "
            "(`mmkit data synth shapes OUTDIR` makes a small example)."
        )

    def resolve(p: str) -> Path:
        p = Path(p).expanduser()
        if p.is_absolute():
            return p
        beside = data_txt.parent / p
        return beside if beside.exists() else p

    sources = []
    for n, line in enumerate(data_txt.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        root, sep, ann = line.partition(",")
        if not sep or not root.strip() or not ann.strip():
            raise ValueError(f"{data_txt}:{n}: expected `<video_root>,<annotation.json>`, got {line!r}.")
        root, ann = resolve(root.strip()), resolve(ann.strip())
        if not root.is_dir():
            raise FileNotFoundError(f"{data_txt}:{n}: video_root {root} is not a folder.")
        if not ann.is_file():
            raise FileNotFoundError(f"{data_txt}:{n}: annotation file {ann} not found.")
        sources.append((root, ann))
    if not sources:
        raise ValueError(f"{data_txt}: no `<video_root>,<annotation.json>` lines.")
    return sources


def _read_annotation(path: Path) -> list:
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        items = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {path} is not valid JSON: {e}") from e
    if not isinstance(items, list):
        raise ValueError(
            f"annotation file {path} must hold a JSON list of items, got {type(items).__name__}."
        )
    return items


def _parse_item(item, root: Path) -> _Clip:
    """An annotation entry as a _Clip, or ValueError saying what is wrong with it."""
    if not isinstance(item, dict):
        raise ValueError(f"item is a {type(item).__name__}, not an object")
    path, cap = item.get("path"), item.get("cap")
    if not isinstance(path, str) or not path:
        raise ValueError('"path" must be a non-empty string')
    if isinstance(cap, list) and cap and all(isinstance(c, str) for c in cap):
        cap = tuple(cap)
    elif not isinstance(cap, str):
        raise ValueError('"cap" must be a string or a non-empty list of strings')
    n, fps = item.get("num_frames"), item.get("fps")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f'"num_frames" must be a positive integer, got {n!r}')
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0):
        raise ValueError(f'"fps" must be a positive number, got {fps!r}')
    full = path if os.path.isabs(path) else str(root / path)
    return _Clip(full, cap, n, None if fps is None else float(fps))


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize frames (T, C, h, w), aspect kept, to just cover height x width, then centre-crop.

    Bilinear with antialiasing (a convex filter: no overshoot). uint8 frames stay uint8: torch's uint8
    path is ~10x faster on CPU than float and differs from it by < 1 level. Example:
    `resize_center_crop(torch.rand(17, 3, 72, 128), 64, 64).shape  # (17, 3, 64, 64)`.
    """
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(
            frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top : top + height, left : left + width]


class VideoDataset(torch.utils.data.Dataset):
    """MindSpeed-format video clips (data.txt + annotation JSON) -> (3, T, H, W) tensors in [-1, 1].

    Args:
        data_txt: a data.txt file, or a list of them; every line of each is a source, read in order.
        num_frames: frames per clip, 4k+1.
        height, width: output size; frames are resized (aspect kept) to cover it and centre-cropped.
        train_fps: frame rate the clips are resampled to (from each file's own rate).
        max_samples: keep only the first N usable annotation entries (over all sources, in order).
        seed: with the epoch and index, picks the temporal crop and the caption of a list.
        random_start: False always takes the first `num_frames` sampled frames.

    Item (`ds[i]` or `ds[SampleKey]`): {"video": float32 (3, T, H, W) in [-1, 1], "caption": str,
    "index": int (the sample actually read), "path": str, "skipped": [records of files skipped on the
    way], "data_state": {"epoch", "consumed"} or None}.

    Stats: `ds.stats` counts skips per reason (SKIP_REASONS), each file once; `ds.report()` logs and
    returns a summary. A DataLoader worker counts in its own copy: call `ds.record_skips(batch)` on each
    batch in the training process so its `ds.stats` sees them too.

    Example:
        >>> ds = VideoDataset("shapes/data.txt", num_frames=17, height=64, width=64, train_fps=16)
        >>> sampler = ResumableSampler(len(ds), seed=0)
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate_videos)
        >>> batch = next(iter(loader)); batch["video"].shape     # (2, 3, 17, 64, 64)
    """

    def __init__(
        self,
        data_txt: str | os.PathLike | Sequence[str | os.PathLike],
        num_frames: int = 17,
        height: int = 64,
        width: int = 64,
        train_fps: float = 16,
        max_samples: int | None = None,
        seed: int = 0,
        random_start: bool = True,
        progress: bool = True,
    ):
        check_num_frames(num_frames)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (pixels).")
        if not train_fps > 0:
            raise ValueError(f"train_fps={train_fps!r} must be > 0 (frames per second).")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples!r} must be positive (or None for all).")
        self.num_frames, self.height, self.width = num_frames, height, width
        self.train_fps, self.seed, self.random_start = float(train_fps), seed, random_start
        self.stats: Counter = Counter()
        self.bad_files: dict[str, str] = {}  # path -> reason, for files found bad while reading
        self._bad_index: set[int] = set()  # indices known bad in this process: not read again

        self.clips: list[_Clip] = []
        self.empty_captions = 0  # clips kept with an empty or whitespace caption
        files = [data_txt] if isinstance(data_txt, (str, os.PathLike)) else list(data_txt)
        if not files:
            raise ValueError("data_txt: give a data.txt file (or a list of them), got an empty list.")
        sources = [src for f in files for src in read_data_txt(f)]
        for root, ann in sources:
            items = _read_annotation(ann)
            for j, item in enumerate(
                tqdm(items, desc=f"video data {ann.name}", unit="clip", disable=not progress)
            ):
                if max_samples is not None and len(self.clips) >= max_samples:
                    break
                try:
                    clip = _parse_item(item, root)
                except ValueError as e:
                    self._count("malformed", f"{ann}:{j}", str(e))
                    continue
                if clip.num_frames is not None and clip.fps is not None:
                    have = len(frame_indices(clip.num_frames, clip.fps, self.train_fps))
                    if have < num_frames:
                        self._count(
                            "too_short", clip.path, self._short_detail(have, clip.num_frames, clip.fps)
                        )
                        continue
                caps = [clip.caption] if isinstance(clip.caption, str) else list(clip.caption)
                if any(not c.strip() for c in caps):
                    self.empty_captions += 1  # kept: it trains unconditionally, which may be unintended
                self.clips.append(clip)
            if max_samples is not None and len(self.clips) >= max_samples:
                break
        if self.stats:
            self.report()
        if self.empty_captions:
            logger.warning(
                "video data: %d of %d clips have an empty or whitespace caption; they train the model "
                'without text (unconditionally). Fix the annotation\'s "cap" if that is not intended.',
                self.empty_captions,
                len(self.clips),
            )
        if not self.clips:
            raise ValueError(
                f"no usable clips in {', '.join(map(str, files))} (skipped: {dict(self.stats) or 'none'}); "
                f"check the annotation files, or lower num_frames={num_frames} / train_fps={self.train_fps:g}."
            )

    # ---- skip bookkeeping -------------------------------------------------------------------------
    def _short_detail(self, have: int, total: int, fps: float) -> str:
        return (
            f"{total} frames at {fps:g} fps give {have} frames at train_fps={self.train_fps:g}, "
            f"fewer than num_frames={self.num_frames}"
        )

    def _count(self, reason: str, name: str, detail: str) -> None:
        self.stats[reason] += 1
        if self.stats[reason] <= _MAX_DETAIL_WARNINGS:
            logger.warning("video data: skipping %s (%s): %s", name, reason, detail)

    def _note_bad(self, index: int, path: str, reason: str, detail: str) -> bool:
        """Remember a bad file; True when it is new to this process (then it is counted)."""
        self._bad_index.add(index)
        if path in self.bad_files:
            return False
        self.bad_files[path] = reason
        self._count(reason, path, detail)
        return True

    def record_skips(self, batch: dict) -> None:
        """Count in this process the skips a DataLoader worker found (no-op for ones counted here).

        Example: `for batch in loader: ds.record_skips(batch); ...`.
        """
        for rec in batch.get("skipped", ()):
            if rec["pid"] != os.getpid():
                self._note_bad(rec["index"], rec["path"], rec["reason"], rec["detail"])

    def report(self) -> dict:
        """Log a warning if samples were skipped and return {"samples", "skipped": {reason: n}, "examples"}.

        Call it at the end of each epoch. Example: `ds.report()["skipped"]  # {'missing': 1}`.
        """
        skipped = {r: self.stats[r] for r in SKIP_REASONS if self.stats[r]}
        examples = dict(list(self.bad_files.items())[:10])
        if skipped:
            logger.warning(
                "video data: %d samples, skipped %d so far (%s)%s",
                len(self.clips),
                sum(skipped.values()),
                ", ".join(f"{r}: {n}" for r, n in skipped.items()),
                "; e.g. " + ", ".join(f"{p} ({r})" for p, r in list(examples.items())[:3])
                if examples
                else "",
            )
        return {"samples": len(self.clips), "skipped": skipped, "examples": examples}

    # ---- reading ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: int | SampleKey) -> dict:
        index, epoch, consumed = (
            (key.index, key.epoch, key.consumed) if isinstance(key, SampleKey) else (key, 0, None)
        )
        n = len(self.clips)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        skipped = []
        for attempt in range(n):  # a bad file: the next index stands in, so the batch keeps its size
            j = (index + attempt) % n
            if j in self._bad_index:
                continue
            clip = self.clips[j]
            rng = np.random.default_rng([self.seed, epoch, j])
            try:
                video = self._load(clip, rng)
            except _Skip as e:
                if self._note_bad(j, clip.path, e.reason, str(e)):
                    skipped.append(
                        {
                            "index": j,
                            "path": clip.path,
                            "reason": e.reason,
                            "detail": str(e),
                            "pid": os.getpid(),
                        }
                    )
                continue
            cap = (
                clip.caption
                if isinstance(clip.caption, str)
                else clip.caption[rng.integers(len(clip.caption))]
            )
            state = None if consumed is None else {"epoch": epoch, "consumed": consumed}
            return {
                "video": video,
                "caption": cap,
                "index": j,
                "epoch": epoch,
                "path": clip.path,
                "skipped": skipped,
                "data_state": state,
            }
        raise ValueError(
            f"video data: none of the {n} samples could be read (skipped: {self.report()['skipped']}); "
            "the warnings above name the files and reasons."
        )

    def _load(self, clip: _Clip, rng: np.random.Generator) -> torch.Tensor:
        """Decode, resample, resize and crop one clip -> (3, T, H, W) in [-1, 1]; _Skip on failure."""
        if not os.path.isfile(clip.path):
            raise _Skip("missing", "file not found")
        x = self._decode(clip, rng)  # (T, 3, H, W) in [0, 255]
        x = (x / 127.5 - 1.0).clamp_(-1.0, 1.0)
        return x.permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)

    def _pick(self, total: int, fps: float, rng: np.random.Generator) -> np.ndarray:
        """The `num_frames` source-frame indices to keep from a `total`-frame file at `fps`."""
        idx = frame_indices(total, fps, self.train_fps)
        if len(idx) < self.num_frames:
            raise _Skip("too_short", self._short_detail(len(idx), total, fps))
        extra = len(idx) - self.num_frames
        begin = int(rng.integers(extra + 1)) if self.random_start and extra else 0
        return idx[begin : begin + self.num_frames]

    def _decode(self, clip: _Clip, rng: np.random.Generator) -> torch.Tensor:
        """The picked frames, each resized + cropped as soon as it is decoded (so a long 1080p clip
        never sits in memory whole): float (T, 3, H, W) in [0, 255]."""
        import av

        try:
            total = clip.num_frames
            with av.open(clip.path) as container:
                if not container.streams.video:
                    raise _Skip("undecodable", "no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                fps = float(rate) if rate else clip.fps
                if not fps:
                    raise _Skip("undecodable", "frame rate unknown (no rate in the file or the annotation)")
                if stream.frames:
                    total = stream.frames
                elif not total:  # no count in the header or the annotation: count packets, no decoding
                    total = sum(1 for p in container.demux(stream) if p.size)
                    container.seek(0, stream=stream)
                want = self._pick(total, fps, rng)
                last, keep, got = int(want[-1]), set(want.tolist()), {}
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):  # up to the last frame needed only
                    if i in keep:
                        rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None]
                        got[i] = resize_center_crop(rgb, self.height, self.width)  # (1, 3, H, W) uint8
                    if i >= last:
                        break
        except _Skip:
            raise
        except Exception as e:  # any decoder failure is this file's: skip and count it
            raise _Skip("undecodable", f"{type(e).__name__}: {e}") from e
        if last not in got:
            raise _Skip("undecodable", f"stream ended before frame {last} (header/annotation says {total})")
        out = torch.empty((len(want), 3, self.height, self.width), dtype=torch.float32)
        for k, i in enumerate(want.tolist()):
            out[k] = got[i][0]  # copy per frame: torch.cat of these strided uint8 crops is ~10x slower
        return out


def collate_videos(items: list[dict]) -> dict:
    """Stack VideoDataset items into a batch.

    Returns {"video": (B, 3, T, H, W), "caption": [str] * B, "index": (B,) long, "epoch": (B,) long
    ((epoch, index) names a sample visit; training keys its noise on it), "path": [str],
    "skipped": all items' skip records, "data_state": the last item's position (None for int keys)}.
    Example: `DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_videos)`.
    """
    if not items:
        raise ValueError("collate_videos: empty batch")
    return {
        "video": torch.stack([it["video"] for it in items]),
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "epoch": torch.tensor([it.get("epoch", 0) for it in items], dtype=torch.long),
        "path": [it["path"] for it in items],
        "skipped": [rec for it in items for rec in it["skipped"]],
        "data_state": items[-1]["data_state"],
    }


class ResumableSampler(torch.utils.data.Sampler):
    """A fixed shuffled order per (seed, epoch), split over ranks, that resumes mid-epoch.

    Epoch e visits `permutation(num_samples)` seeded by (seed, e); rank r takes global positions
    r, r + world_size, ... of it (the tail that does not divide evenly is dropped, so ranks stay in
    step). It yields `SampleKey(index, epoch, consumed)`; `collate_videos` turns the last one of a
    batch into `batch["data_state"]`. When an epoch has been read to the end, the next `iter()` starts
    the next epoch. `consumed` counts over all ranks, so a checkpoint resumes on another rank count
    when the position divides evenly by it (true when the global batch is a multiple of world_size).

    Example:
        >>> sampler = ResumableSampler(len(ds), seed=0, rank=rank, world_size=world)
        >>> sampler.load_state_dict(ckpt["data"])           # resume: state saved from batch["data_state"]
        >>> for batch in DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate_videos): ...
    """

    def __init__(
        self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: the dataset is empty (every sample was skipped?).")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split over world_size={world_size} ranks.")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.consumed = 0, 0

    @property
    def per_epoch(self) -> int:
        """Samples used per epoch over all ranks."""
        return self.num_samples // self.world_size * self.world_size

    def order(self, epoch: int) -> np.ndarray:
        """The global order of epoch `epoch` (dataset indices). Example: `sampler.order(0)[:4]`."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning. Example: `sampler.set_epoch(3)`."""
        self.epoch, self.consumed = epoch, 0

    def __len__(self) -> int:
        return (self.per_epoch - self.consumed) // self.world_size

    def __iter__(self):
        epoch, start = self.epoch, self.consumed // self.world_size
        local = self.order(epoch)[: self.per_epoch][self.rank :: self.world_size]
        for k in range(start, len(local)):
            yield SampleKey(int(local[k]), epoch, (k + 1) * self.world_size)
        self.epoch, self.consumed = epoch + 1, 0  # read to the end: the next iter() is the next epoch

    def state_dict(self) -> dict:
        """Where the next `iter()` starts. For a checkpoint save `batch["data_state"]` instead (DataLoader
        prefetching runs this sampler ahead of training). Example: `sampler.state_dict()`."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position: `batch["data_state"]` or a `state_dict()`.

        Example: `sampler.load_state_dict({"epoch": 1, "consumed": 8})`.
        """
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples)):
            if key in state and state[key] != mine:
                logger.warning(
                    "data state was saved with %s=%s but this run has %s; the order will differ",
                    key,
                    state[key],
                    mine,
                )
        if consumed % self.world_size:
            raise ValueError(
                f"data position consumed={consumed} does not divide by world_size={self.world_size}; resume "
                "with a data-parallel size that divides the global batch."
            )
        if consumed >= self.per_epoch:
            epoch, consumed = epoch + 1, 0
        self.epoch, self.consumed = epoch, consumed
