"""Writing generated videos (.mp4 / .npy / .png grid) and reading images and videos back.

Frames travel as float arrays (T, H, W, 3) in [0, 1], numpy or torch, the way the pipelines return them.
Encoding is PyAV (libx264, yuv420p) and Pillow. This file knows nothing of models or pipelines.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from mmkit.common import MAX_IMAGE_PIXELS

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # explicit, not Pillow's default: bombs fail from the header

VIDEO_SUFFIXES = (".mp4", ".npy", ".png")
MP4_CRF = 17  # libx264 constant-rate factor: near visually lossless, still ~10x smaller than raw


def _as_frames(frames) -> np.ndarray:
    """Frames as float32 (T, H, W, 3) clipped to [0, 1]; a clear error for any other shape or NaN/inf."""
    if hasattr(frames, "detach"):  # torch.Tensor (any dtype/device) without importing torch here
        frames = frames.detach().float().cpu().numpy()
    arr = np.asarray(frames, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(
            f"frames must be a non-empty float array of shape (T, H, W, 3), got shape {tuple(arr.shape)}; "
            "for a pipeline output `out` of shape (B, T, H, W, 3) pass `out[0]`."
        )
    if not np.isfinite(arr).all():
        raise ValueError("frames contain NaN or inf values; nothing was written.")
    return np.clip(arr, 0.0, 1.0)


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.round(frames * 255.0).astype(np.uint8)  # round, not truncate: halves the quantisation error


def frame_grid(frames, cols: int | None = None) -> np.ndarray:
    """Tile frames (T, H, W, 3) in [0, 1] into one uint8 image (rows*H, cols*W, 3), row by row.

    `cols` defaults to ceil(sqrt(T)), the near-square layout (5 frames -> 3 x 2); empty cells are black.
    Example: `Image.fromarray(frame_grid(video, cols=4)).save("grid.png")`.
    """
    u8 = _to_uint8(_as_frames(frames))
    t, h, w, _ = u8.shape
    cols = math.ceil(math.sqrt(t)) if cols is None else int(cols)
    if cols < 1:
        raise ValueError(f"frame_grid: cols must be >= 1, got {cols}.")
    cols = min(cols, t)
    rows = math.ceil(t / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, frame in enumerate(u8):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = frame
    return grid


def _write_mp4(u8: np.ndarray, path: Path, fps: float) -> None:
    import av

    # yuv420p stores chroma at half resolution, so libx264 needs even sizes: pad odd ones by repeating
    # the last row/column (the video is then at most one pixel larger; nothing is cropped away).
    t, h, w, _ = u8.shape
    if h % 2 or w % 2:
        u8 = np.pad(u8, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = u8.shape[2], u8.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        stream.codec_context.thread_count = 1  # x264's threads make the bytes depend on CPU load
        for frame in u8:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)


def save_video(frames, path: str | os.PathLike, fps: float = 16) -> Path:
    """Write frames (T, H, W, 3) in [0, 1] to `path`; the suffix picks the format. Returns the path.

    `.mp4`: H.264 (libx264, yuv420p) at `fps` frames per second; odd heights/widths are padded by one edge
    pixel. `.npy`: the float32 frames themselves. `.png`: all frames tiled by `frame_grid`.
    Example: `save_video(pipe(prompt="a red cube spins").frames[0], "out/cube.mp4", fps=16)`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"cannot write video to {path}: unsupported suffix {path.suffix or '(none)'!r}; "
            f"use one of {', '.join(VIDEO_SUFFIXES)}."
        )
    if not fps > 0:
        raise ValueError(f"save_video: fps must be > 0, got {fps}.")
    arr = _as_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(path, arr)
    elif suffix == ".png":
        Image.fromarray(frame_grid(arr)).save(path)
    else:
        _write_mp4(_to_uint8(arr), path, fps)
    return path


def load_image(path) -> Image.Image:
    """Open an image file as an RGB `PIL.Image.Image` (a PIL image passed in is converted to RGB).

    Raises FileNotFoundError for a missing file and ValueError naming the file for an unreadable one.
    Example: `image = load_image("assets/first_frame.png")`.
    """
    if isinstance(path, Image.Image):
        return path.convert("RGB")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"{im.width}x{im.height} pixels, more than the {MAX_IMAGE_PIXELS} mmkit decodes"
                )
            im.load()  # decode now, so a truncated file fails here rather than later
            return im.convert("RGB")
    except Exception as e:  # any decoder failure (bombs, truncation, bad headers) is this file's fault
        raise ValueError(f"{path}: not a readable image ({e}); pass a valid PNG/JPEG/WebP file.") from e


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file as uint8 RGB, shape (T, H, W, 3), with PyAV.

    Example: `frames = read_video("out/cube.mp4"); frames.shape  # (5, 32, 32, 3)`.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: holds no video stream.")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.FFmpegError as e:
        raise ValueError(f"{path}: not a readable video ({e}).") from e
    if not frames:
        raise ValueError(f"{path}: the video stream has no frames.")
    return np.stack(frames)
