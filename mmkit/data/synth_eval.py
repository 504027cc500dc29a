"""A detector for moving-shape clips: what a video shows, measured against its caption's ground truth.

`detect(frames)` reads a clip (T, H, W, 3) in [0, 1], generated or synthetic, and names, in the words of
the synthetic grammar (`mmkit.data.synth`):
- the background: the colour of the border pixels (median over all frames), nearest named background;
- the shape's colour: the median of the pixels far from the background, nearest named shape colour;
- the shape class, on each frame rolled so that the shape's circular centroid is in the middle (a
  shape that wrapped around an edge is whole again), from two measures of its bounding box that
  survive the rounding a small VAE gives corners (medians over frames):
  the share of the shape's pixels in the box's top half (an apex-up triangle ~0.25, a circle or square
  0.5) and how much of the box's corners (outside the inscribed ellipse, ~21% of the box) it fills
  (square 1, circle ~0); a square whose corners a decoder rounded keeps 0.2-0.8 of them;
- the direction: the sign of the larger axis of the centroid's displacement (a least-squares slope
  over the frames, so one bad frame does not flip it).

`score(frames, prompt)` compares that with `parse_caption(prompt)`; `Tally` sums scores into accuracy per
attribute. Nothing here knows about models: `mmkit eval shapes` feeds it generated clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmkit.data.synth import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES

ATTRIBUTES = ("background", "color", "shape", "direction")
# chance level of each attribute for a detector that guesses, over uniformly drawn captions
CHANCE = {"background": 1 / len(BACKGROUNDS), "color": 1 / len(COLORS), "shape": 1 / len(SHAPES)}
CHANCE["direction"] = 1 / len(DIRECTIONS)

_FG_DIST = 0.25  # RGB distance (0..1 units) from the background above which a pixel is the shape's;
# every shape colour is >= ~0.5 from every background it is paired with (synth.COLORS), so half of it
_MIN_PIXELS = 4  # fewer foreground pixels in a frame: no shape in that frame
_TRIANGLE_TOP = 0.42  # top-half share: triangle ~0.27 (rendered; 0.31-0.44 through the tiny VAE), others 0.5
_SQUARE_CORNERS = (
    0.25  # corner fill: circle 0-0.2 (pixel edges), square 0.94-1 (0.2-0.8 through the tiny VAE)
)


def parse_caption(prompt: str) -> dict[str, str]:
    """Ground truth of a synthetic caption. Example:
    `parse_caption("a red circle moves left on a black background")`
    -> {"color": "red", "shape": "circle", "direction": "left", "background": "black"}."""
    words = prompt.strip().rstrip(".").split()
    # "a {color} {shape} moves {direction} on a {background} background"
    if len(words) != 9 or words[0] != "a" or words[3] != "moves" or words[5:7] != ["on", "a"]:
        raise ValueError(
            f"prompt {prompt!r} is not a synthetic shapes caption; expected "
            "'a COLOR SHAPE moves DIRECTION on a BACKGROUND background' (mmkit.data.synth.caption)"
        )
    truth = {"color": words[1], "shape": words[2], "direction": words[4], "background": words[7]}
    for key, names in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        if truth[key] not in names:
            raise ValueError(f"prompt {prompt!r}: {key} {truth[key]!r} is not one of {list(names)}")
    if truth["background"] not in BACKGROUNDS:
        raise ValueError(f"prompt {prompt!r}: background {truth['background']!r} not in {list(BACKGROUNDS)}")
    return truth


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    ref = np.array([table[n] for n in names], np.float32) / 255
    return names[int(np.argmin(((ref - rgb) ** 2).sum(-1)))]


def _box_measures(box: np.ndarray) -> tuple[float, float]:
    """(share of the shape's pixels in the top half of its bounding box, filled fraction of the box's
    corners outside the inscribed ellipse) for a boolean (h, w) box."""
    h, w = box.shape
    rows = box.sum(1).astype(np.float64)
    top = rows[: h // 2].sum() + (rows[h // 2] / 2 if h % 2 else 0.0)  # the middle row counts half
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    outside = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2 > 1
    corner = float(box[outside].mean()) if outside.any() else 0.0
    return float(top / max(rows.sum(), 1.0)), corner


def _circular_mean(pos: np.ndarray, size: int) -> float:
    """Mean pixel coordinate on a circle of `size` pixels: a shape split across opposite edges (it left
    the frame on one side and came back on the other) is located where it is, not between its halves."""
    a = (pos + 0.5) * (2 * np.pi / size)
    return float(np.arctan2(np.sin(a).mean(), np.cos(a).mean()) % (2 * np.pi) * size / (2 * np.pi) - 0.5)


def detect(frames: np.ndarray) -> dict[str, str]:
    """What a clip shows: {"background", "color", "shape", "direction"} in the grammar's words.

    `frames`: (T, H, W, 3) float in [0, 1] (uint8 is accepted). Example:
    `detect(render_shape_video("red", "circle", "left", "black", 17, 64, 64, np.random.default_rng(0)))`
    -> {"background": "black", "color": "red", "shape": "circle", "direction": "left"}.
    """
    f = np.asarray(frames)
    if f.dtype == np.uint8:
        f = f.astype(np.float32) / 255
    if f.ndim != 4 or f.shape[-1] != 3:
        raise ValueError(f"frames: expected (T, H, W, 3), got shape {f.shape}")
    f = f.astype(np.float32)
    T, H, W, _ = f.shape
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)  # (T, 2H + 2W, 3)
    bg_rgb = np.median(border.reshape(-1, 3), axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)

    dist = np.sqrt(((f - bg_rgb) ** 2).sum(-1))  # (T, H, W)
    mask = dist > _FG_DIST
    fg = f[mask]
    color = _nearest(np.median(fg, axis=0), COLORS) if len(fg) else _nearest(bg_rgb, COLORS)

    yy, xx = np.mgrid[0:H, 0:W]
    centroids, tops, corners = [], [], []
    for t in range(T):
        m = mask[t]
        n = int(m.sum())
        if n < _MIN_PIXELS:
            continue
        cx, cy = _circular_mean(xx[m], W), _circular_mean(yy[m], H)
        centroids.append((t, cx, cy))
        # the frame rolled to put the shape in its middle: a shape that wrapped around an edge is whole again
        m = np.roll(m, (H // 2 - round(cy), W // 2 - round(cx)), axis=(0, 1))
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        inside = rows[0] > 0 and cols[0] > 0 and rows[-1] < H - 1 and cols[-1] < W - 1
        if inside:  # a shape still touching the edge (larger than the frame, or noise) has a misleading box
            top, corner = _box_measures(m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
            tops.append(top)
            corners.append(corner)
    shape = "circle"  # no measurable frame: an arbitrary fixed guess
    if tops:
        if float(np.median(tops)) < _TRIANGLE_TOP:
            shape = "triangle"
        elif float(np.median(corners)) > _SQUARE_CORNERS:
            shape = "square"

    direction = "right"  # no track: an arbitrary fixed guess
    if len(centroids) >= 2:  # mean velocity from frame-to-frame moves, each the shortest way round
        c = np.array(centroids, np.float64)
        moves = np.diff(c, axis=0)
        for k, size in ((1, W), (2, H)):
            moves[:, k] = (moves[:, k] + size / 2) % size - size / 2
        span = float(c[-1, 0] - c[0, 0])
        vx, vy = float(moves[:, 1].sum()) / span, float(moves[:, 2].sum()) / span
        if abs(vx) >= abs(vy):
            direction = "right" if vx >= 0 else "left"
        else:
            direction = "down" if vy >= 0 else "up"  # image y grows downward
    return {"background": background, "color": color, "shape": shape, "direction": direction}


def score(frames: np.ndarray, prompt: str) -> dict[str, bool]:
    """Per attribute, whether the clip shows what the prompt says. Example:
    `score(frames, "a red circle moves left on a black background")  # {"background": True, ...}`."""
    truth, seen = parse_caption(prompt), detect(frames)
    return {k: seen[k] == truth[k] for k in ATTRIBUTES}


@dataclass
class Tally:
    """Running accuracy per attribute. Example: `t = Tally(); t.add(score(v, p)); t.accuracy()`."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTES, 0))
    total: int = 0

    def add(self, scores: dict[str, bool]) -> None:
        for k in ATTRIBUTES:
            self.hits[k] += int(scores[k])
        self.total += 1

    def accuracy(self) -> dict[str, float]:
        return {k: self.hits[k] / max(self.total, 1) for k in ATTRIBUTES}
