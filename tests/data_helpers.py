"""Shared helpers for processor/data tests: small synthetic images and an mp4 written with PyAV."""

from __future__ import annotations

import av
import numpy as np
from PIL import Image


def make_image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A gradient + noise image (so resampling really mixes neighbours); mode RGB, RGBA or L."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * 255 // max(h - 1, 1)), (xx * 255 // max(w - 1, 1)), ((yy + xx) * 7) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(h, w, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([arr, alpha], -1), mode="RGBA")
    img = Image.fromarray(arr)
    return img.convert("L") if mode == "L" else img


def write_video(path, n_frames: int = 20, fps: int = 10, h: int = 50, w: int = 70) -> None:
    """A small H.264 mp4 with moving content."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "18"}
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n_frames):
            arr = np.stack([(xx * 3 + i * 12) % 256, (yy * 5) % 256, ((xx + yy + i * 20) * 2) % 256], -1)
            for p in s.encode(av.VideoFrame.from_ndarray(arr.astype(np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_bomb_png(path, width: int = 20000, height: int = 20000) -> None:
    """A PNG whose header claims width x height pixels (a decompression bomb) in a few dozen bytes."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    data = bytearray(open(path, "rb").read())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    open(path, "wb").write(bytes(data))
