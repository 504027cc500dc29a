"""Synthetic data sets for tests and the demo: moving-shape videos and shape Q&A images.

`synth_shapes` writes real mp4 clips of one coloured shape moving in a named direction over a plain
background, captioned "a red circle moves left on a black background", in the MindSpeed layout that
`mmkit.data.video.VideoDataset` reads (videos/, annotation.json, data.txt), and holds a few caption
combinations out of training for the demo (heldout_prompts.json).

`synth_shapes_qa` writes PNG images of one to three shapes and messages-format Q&A records about their
colour, shape, position and count (qa.json), which `mmkit.data.sft.SFTDataset` reads.

Everything is deterministic per seed. Nothing here knows about models.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mmkit.infer.media import save_video
from mmkit.outputs import claim_output_dir

# RGB uint8. Every shape colour differs from every background by >= 40 in luma (BT.601), so edges stay
# sharp after H.264's half-resolution chroma. A shape colour and a background sharing a name ("blue")
# are never paired.
COLORS = {
    "red": (230, 40, 40),
    "green": (30, 160, 50),
    "blue": (50, 90, 240),
    "yellow": (250, 230, 30),
    "white": (245, 245, 245),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (170, 170, 170), "blue": (20, 30, 110)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downward
SENSE_SIZE = {False: 0.8, True: 1.25}  # shape size by sense of motion: left / up smaller, right / down larger
NUM_HELDOUT = 4


def caption(color: str, shape: str, direction: str, background: str) -> str:
    """The caption of one synthetic clip. Example: `caption("red", "circle", "left", "black")`."""
    return f"a {color} {shape} moves {direction} on a {background} background"


def shape_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of a shape centred at (cx, cy) pixels with half-size r pixels.

    circle: radius r; square: side 1.6 r; triangle: apex up, base 2 r wide.
    Example: `shape_mask("circle", 32, 32, 8, 64, 64).sum()  # ~201 pixels`.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "triangle":
        # apex (cx, cy - r), base corners (cx +- r, cy + r): inside when below the apex edges
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


@dataclass
class SynthSet:
    """What `synth_shapes` wrote: the folder, data.txt, annotation.json, clip count, held-out prompts."""

    root: Path
    data_txt: Path
    annotation: Path
    videos: int
    heldout_prompts: list[str]


def _combos() -> list[tuple[str, str, str, str]]:
    return [
        (c, s, d, b)
        for c, s, d, b in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)
        if c != b  # same-coloured shape and background: invisible
    ]


def _split(videos: int, rng: np.random.Generator, heldout: int = NUM_HELDOUT) -> tuple[list, list]:
    """(training combination per clip, held-out combinations); held-out ones never appear in training.

    Held-out combinations are preferably ones whose colour, shape, direction and background each occur
    in training, so the demo tests composing seen parts, not unseen words.
    """
    combos = [_combos()[i] for i in rng.permutation(len(_combos()))]
    pool = len(combos) - heldout
    if videos >= pool:  # every combination but the held-out ones, cycled
        return [combos[i % pool] for i in range(videos)], combos[pool:]
    train = combos[:videos]
    seen = [set(parts) for parts in zip(*train)]
    rest = combos[videos:]
    covered = [c for c in rest if all(p in s for p, s in zip(c, seen))]
    held = (covered + [c for c in rest if c not in covered])[:heldout]
    return train, held


def render_shape_video(
    color: str, shape: str, direction: str, background: str, num_frames: int, height: int, width: int, rng
) -> np.ndarray:
    """Frames (T, H, W, 3) float in [0, 1] of a shape moving in `direction`, wrapping around the frame.

    The shape starts anywhere and moves ~1/60 of the short side per frame (at 64 px and 17 frames, about
    three quarters of the frame), wrapping around at the edges, at a random position across. Its size
    marks the sense of motion: moving left or up, its half-size r is 0.8 x (0.85-1.15) x 1/6 of the short
    side; moving right or down, 1.25 x as much (`SENSE_SIZE`). Why: a Wan DiT has only relative (RoPE)
    positions, and in trials a shapes DiT learned the axis of motion from the word but its sense only at
    chance, even from two captions differing in that one word, with a trail behind the shape, or with a
    lighter or darker core in it; the sense followed the word once the word also set something the whole
    shape shows in every frame (its colour, or its size).
    Example: `render_shape_video("red", "circle", "left", "black", 17, 64, 64, np.random.default_rng(0))`.
    """
    dx, dy = DIRECTIONS[direction]
    unit = min(height, width) / 6 * rng.uniform(0.85, 1.15)
    r = max(3.0, unit * SENSE_SIZE[dx + dy > 0])
    along = width if dx else height
    across = height if dx else width
    travel = unit * rng.uniform(0.25, 0.3) * (num_frames - 1)  # the same speed whatever the size
    start = rng.uniform(0, along)  # centre at frame 0; positions wrap around the frame
    side = rng.uniform(r + 1, across - r - 1)
    bg = np.array(BACKGROUNDS[background], np.float32) / 255
    fg = np.array(COLORS[color], np.float32) / 255

    def mask(c: float) -> np.ndarray:  # the shape at `c` along the motion, wrapped around the frame
        m = np.zeros((height, width), bool)
        for off in (-along, 0, along):
            cx, cy = (c + off, side) if dx else (side, c + off)
            m |= shape_mask(shape, cx, cy, r, height, width)
        return m

    step = (dx + dy) * travel / max(num_frames - 1, 1)
    frames = np.empty((num_frames, height, width, 3), np.float32)
    for t in range(num_frames):
        frames[t] = bg
        frames[t][mask((start + step * t) % along)] = fg
    return frames


def synth_shapes(
    outdir: str | os.PathLike,
    videos: int = 64,
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    fps: float = 16,
    seed: int = 0,
    progress: bool = True,
    heldout: int = NUM_HELDOUT,
    overwrite: bool = False,
) -> SynthSet:
    """Write a synthetic text-to-video set of moving shapes in the MindSpeed layout.

    Files: `videos/000000.mp4 ...` (H.264), `annotation.json` (a list of {"path", "cap", "num_frames",
    "fps", "resolution": {"height", "width"}}, paths relative to OUTDIR), `data.txt` (one line
    `<OUTDIR>,<OUTDIR>/annotation.json`, absolute paths) and `heldout_prompts.json` (captions of
    `heldout` combinations kept out of training, for generation demos and `mmkit eval shapes`; the
    same seed and `heldout` give the same held-out set whatever the video count). A set an earlier run
    wrote is replaced whole (no orphan clips) only with `overwrite=True`; any other non-empty folder is
    refused.

    Example: `synth_shapes("data/shapes", videos=64, num_frames=17, height=64, width=64, fps=16)`.
    """
    if videos < 1:
        raise ValueError(f"videos={videos} must be >= 1.")
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames} must be >= 2 for a shape to move.")
    if height < 16 or width < 16:
        raise ValueError(f"height={height}, width={width}: use at least 16 x 16 pixels.")
    if not fps > 0:
        raise ValueError(f"fps={fps} must be > 0.")
    if not 1 <= heldout <= len(_combos()) - 1:
        raise ValueError(f"heldout={heldout}: keep between 1 and {len(_combos()) - 1} combinations out.")
    root = claim_output_dir(Path(outdir).resolve(), "data synth shapes", overwrite)
    (root / "videos").mkdir()
    rng = np.random.default_rng(seed)
    train, held = _split(videos, rng, heldout)

    items = []
    for i, combo in enumerate(tqdm(train, desc="synth shapes", unit="video", disable=not progress)):
        clip_rng = np.random.default_rng([seed, i])  # one stream per clip: clip i is the same for any count
        frames = render_shape_video(*combo, num_frames, height, width, clip_rng)
        rel = f"videos/{i:06d}.mp4"
        save_video(frames, root / rel, fps=fps)
        items.append(
            {
                "path": rel,
                "cap": caption(*combo),
                "num_frames": num_frames,
                "fps": fps,
                "resolution": {"height": height, "width": width},
            }
        )
    annotation = root / "annotation.json"
    annotation.write_text(json.dumps(items, indent=1) + "\n")
    data_txt = root / "data.txt"
    data_txt.write_text(f"{root},{annotation}\n")
    prompts = [caption(*c) for c in held]
    (root / "heldout_prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")
    return SynthSet(root, data_txt, annotation, len(items), prompts)


QA_POSITIONS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
QA_KINDS = ("color", "shape", "position", "count")
_NUMBERS = {1: "one", 2: "two", 3: "three"}


def render_qa_image(size: int, rng) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """One shapes-qa image (size, size, 3) uint8 on black: 1-3 shapes of distinct colours and kinds, one
    per quadrant, and its objects [(color, shape, position)]. Example:
    `img, objects = render_qa_image(112, np.random.default_rng(0))`."""
    n = int(rng.integers(1, 4))
    colors = rng.choice(list(COLORS), n, replace=False).tolist()
    shapes = rng.choice(SHAPES, n, replace=False).tolist()
    wheres = rng.choice(list(QA_POSITIONS), n, replace=False).tolist()
    img = np.zeros((size, size, 3), np.uint8)
    half = size / 2
    for c, s, w in zip(colors, shapes, wheres):
        row, col = QA_POSITIONS[w]
        r = half * rng.uniform(0.25, 0.35)
        cx = col * half + rng.uniform(r + 1, half - r - 1)
        cy = row * half + rng.uniform(r + 1, half - r - 1)
        img[shape_mask(s, cx, cy, r, size, size)] = COLORS[c]
    return img, list(zip(colors, shapes, wheres))


def _qa(kind: str, objects: list[tuple[str, str, str]], rng) -> tuple[str, str]:
    """(question, answer) about objects [(color, shape, position)] of one image."""
    color, shape, where = objects[rng.integers(len(objects))]
    if kind == "color":
        return f"What color is the {shape}?", color
    if kind == "shape":
        return f"What shape is the {color} object?", shape
    if kind == "position":
        return f"Where is the {color} {shape}?", where
    n = len(objects)
    return "How many shapes are in the image?", _NUMBERS[n]


def synth_shapes_qa(
    outdir: str | os.PathLike,
    images: int = 64,
    size: int = 112,
    turns: int = 1,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    single_turn: bool = False,
) -> Path:
    """Write PNG images of 1-3 shapes and messages-format Q&A about them; returns the qa.json path.

    Each image has shapes of distinct colours and kinds, one per quadrant, on a black background.
    Each record asks `turns` questions (colour, shape, position, count; kinds rotate over records):
    {"messages": [{"role": "user", "content": "<image>What color is the square?"},
                  {"role": "assistant", "content": "red"}], "images": ["images/000000.png"]}
    Image paths are relative to OUTDIR, where qa.json lies (SFTDataset's default media root). A set an
    earlier run wrote is replaced only with `overwrite=True`; any other non-empty folder is refused.

    `single_turn=True` writes each of an image's `turns` questions as its own one-turn record (same
    image, records in image order). Use it for training: in a conversation the questions name the
    attributes other turns ask for ("What color is the triangle?" then "What shape is the blue
    object?"), so later answers can be copied from the text instead of read from the image.

    Example: `synth_shapes_qa("data/shapes_qa", images=256, size=112)`.
    """
    if images < 1:
        raise ValueError(f"images={images} must be >= 1.")
    if size < 32:
        raise ValueError(f"size={size}: use at least 32 pixels.")
    if turns < 1:
        raise ValueError(f"turns={turns} must be >= 1.")
    root = claim_output_dir(Path(outdir).resolve(), "data synth shapes-qa", overwrite)
    (root / "images").mkdir()
    records = []
    for i in tqdm(range(images), desc="synth shapes-qa", unit="image", disable=not progress):
        rng = np.random.default_rng([seed, i])
        img, objects = render_qa_image(size, rng)
        rel = f"images/{i:06d}.png"
        Image.fromarray(img).save(root / rel)
        messages = []
        for t in range(turns):
            question, answer = _qa(QA_KINDS[(i * turns + t) % len(QA_KINDS)], objects, rng)
            first = t == 0 or single_turn
            messages.append({"role": "user", "content": ("<image>" if first else "") + question})
            messages.append({"role": "assistant", "content": answer})
        if single_turn:
            records.extend(
                {"messages": messages[k : k + 2], "images": [rel]} for k in range(0, len(messages), 2)
            )
        else:
            records.append({"messages": messages, "images": [rel]})
    path = root / "qa.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
