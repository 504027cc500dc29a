"""Qwen2.5-VL processor: images/videos -> patch rows + grids, text -> token ids with expanded placeholders.

What it does, in the order a call runs:
1. images: RGB (alpha composited on white), `smart_resize` to multiples of patch*merge (28) within
   [min_pixels, max_pixels], Pillow bicubic, rescale by 1/255, CLIP normalise, patchify into rows of
   C*temporal_patch*patch*patch = 1176 values; `image_grid_thw` = (1, H/14, W/14).
2. videos: PyAV decode, frames sampled at a target fps (transformers' Qwen2VLVideoProcessor rule),
   optional `max_frames`, the same per-frame resize/normalise, frames grouped by 2 in time;
   `video_grid_thw` = (F/2, H/14, W/14) and `second_per_grid_ts` = 2 / sampled fps.
3. text: every <|image_pad|> / <|video_pad|> is expanded to t*h*w/merge^2 copies, then tokenized by
   the folder's tokenizer (transformers AutoTokenizer) with left (default) or right padding.

Output keys and shapes equal transformers' Qwen2_5_VLProcessor (Pillow backend). Video frames are
resized with Pillow like images (transformers uses torchvision there, which is not importable here).
This file holds no model code; the chat template is the folder's own.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmkit.common import MAX_IMAGE_PIXELS

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # explicit, not Pillow's default: bombs fail from the header

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
_PLACEHOLDER_RE = re.compile(re.escape(IMAGE_TOKEN) + "|" + re.escape(VIDEO_TOKEN))


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------
def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Example:
        >>> smart_resize(61, 93, factor=28, min_pixels=3136, max_pixels=12544)
        (56, 84)
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size {height}x{width}: both sides must be positive")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"image size {height}x{width}: aspect ratio {max(height, width) / min(height, width):.1f} is above "
            "200; crop or pad the image first"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:  # shrink by the area ratio, rounding down to stay under the cap
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:  # grow, rounding up to reach the floor
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(frames: np.ndarray, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
    """(F, C, H, W) float32 frames -> ((gt*gh*gw, C*tp*p*p) rows, (gt, gh, gw)).

    Rows are ordered (t, h-block, w-block, h-in-block, w-in-block) so that each run of merge^2 rows
    is one 2x2 merged LLM token; each row is laid out (C, tp, p, p). F is padded to a multiple of
    `temporal_patch_size` by repeating the last frame (a single image becomes 2 equal frames).

    Example:
        >>> rows, grid = patchify(np.zeros((1, 3, 56, 84), np.float32))  # rows (24, 1176), grid (1, 4, 6)
    """
    f, c, h, w = frames.shape
    assert h % (patch_size * merge_size) == 0 and w % (patch_size * merge_size) == 0, (h, w)
    if pad := -f % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        f += pad
    gt, gh, gw = f // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(
        gt,
        temporal_patch_size,
        c,
        gh // merge_size,
        merge_size,
        patch_size,
        gw // merge_size,
        merge_size,
        patch_size,
    )
    # -> (gt, gh/m, gw/m, m, m, C, tp, p, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (
        gt,
        gh,
        gw,
    )


def to_rgb(image: Image.Image | np.ndarray | str | Path) -> Image.Image:
    """Open/convert to an RGB PIL image; transparency is composited onto white (as transformers does).

    Example:
        >>> img = to_rgb("cat.png")
    """
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file {image} does not exist")
        try:
            with Image.open(image) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(
                        f"{im.width}x{im.height} pixels, more than the {MAX_IMAGE_PIXELS} allowed"
                    )
                im.load()
                image = im.copy()
        except Exception as e:  # any decoder failure (bombs, truncation, bad headers) names the file
            raise ValueError(f"image file {image}: not a readable image ({e})") from e
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 (H, W, 3|4), got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, a uint8 (H, W, 3) array or a path, got {type(image)}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------
# Video decode + frame sampling
# ----------------------------------------------------------------------------------------------------
@dataclass
class Video:
    """Decoded frames of one video: `frames` uint8 (F, H, W, 3); `sampled_fps` = frames per second kept."""

    frames: np.ndarray
    sampled_fps: float
    indices: list[int] = field(default_factory=list)


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    temporal_patch_size: int = 2,
) -> list[int]:
    """Indices of the frames kept when sampling `fps` frames per second (transformers' Qwen2-VL rule).

    The count is total/video_fps*fps clamped to [min_frames, min(max_frames, total)], rounded down to
    a multiple of `temporal_patch_size`; the indices are spread evenly from frame 0. A video shorter
    than one temporal patch keeps all its frames (patchify repeats the last one).

    Example:
        >>> sample_frame_indices(30, video_fps=10.0, fps=2.0)
        [0, 5, 10, 15, 20, 25]
    """
    if total_frames <= 0:
        raise ValueError(f"video has {total_frames} frames; nothing to sample")
    cap = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
    n = total_frames / video_fps * fps
    n = min(max(n, min_frames), cap, total_frames)
    n = math.floor(n / temporal_patch_size) * temporal_patch_size
    if n <= 0:
        return list(range(total_frames))
    # float32 arange + truncation, as the reference does, so indices match it exactly
    return torch.arange(0, total_frames, total_frames / n).int().tolist()[:n]


def load_video(
    path: str | Path,
    fps: float = 2.0,
    max_frames: int = 768,
    min_frames: int = 4,
    temporal_patch_size: int = 2,
) -> Video:
    """Decode a video file with PyAV and keep the frames sampled at `fps` frames per second.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for one PyAV
    cannot decode. Example:
        >>> v = load_video("clip.mp4", fps=2.0, max_frames=16)   # v.frames (F, H, W, 3) uint8
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else 24.0
            total = int(stream.frames)
            if total <= 0:  # container without a frame count: decode once to count
                total = sum(1 for _ in container.decode(video=0))
                container.seek(0)
            indices = sample_frame_indices(total, video_fps, fps, min_frames, max_frames, temporal_patch_size)
            wanted, frames = set(indices), []
            for i, frame in enumerate(container.decode(video=0)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise ValueError(f"video file {path} could not be decoded: {e}") from e
    if len(frames) != len(indices):
        # the header over-counted frames: keep what decoded, as if those were all there is
        indices = indices[: len(frames)]
        if not frames:
            raise ValueError(f"video file {path} has no decodable frames")
    return Video(frames=np.stack(frames), sampled_fps=len(indices) / total * video_fps, indices=indices)


# ----------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    """Pixel pipeline settings, read from preprocessor_config.json / video_preprocessor_config.json."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    fps: float = 2.0  # video sampling rate (frames kept per second)
    min_frames: int = 4
    max_frames: int = 768

    @classmethod
    def from_json(cls, path: Path, base: VisionConfig | None = None) -> VisionConfig:
        """Fields of a preprocessor json over `base` (or the defaults); unknown fields are ignored.
        A damaged file is one ValueError naming it."""
        try:
            return cls._from_json(path, base)
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid preprocessor config ({e})") from e

    @classmethod
    def _from_json(cls, path: Path, base: VisionConfig | None = None) -> VisionConfig:
        raw = json.loads(path.read_text())
        cfg = VisionConfig(**vars(base)) if base is not None else cls()
        size = raw.get("size") or {}
        cfg.min_pixels = int(raw.get("min_pixels") or size.get("shortest_edge") or cfg.min_pixels)
        cfg.max_pixels = int(raw.get("max_pixels") or size.get("longest_edge") or cfg.max_pixels)
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_frames", "max_frames"):
            if raw.get(name) is not None:
                setattr(cfg, name, int(raw[name]))
        for name in ("rescale_factor", "fps"):
            if raw.get(name) is not None:
                setattr(cfg, name, float(raw[name]))
        for name in ("image_mean", "image_std"):
            if raw.get(name) is not None:
                setattr(cfg, name, tuple(float(v) for v in raw[name]))
        cfg.validate(path.name)
        return cfg

    def validate(self, where: str) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"{where}: min_pixels={self.min_pixels}, max_pixels={self.max_pixels}; need 0 < min <= max"
            )
        if self.patch_size <= 0 or self.merge_size <= 0 or self.temporal_patch_size <= 0:
            raise ValueError(f"{where}: patch_size, merge_size and temporal_patch_size must be positive")
        if self.fps <= 0 or self.max_frames <= 0:
            raise ValueError(f"{where}: fps={self.fps} and max_frames={self.max_frames} must be positive")


def _normalize(frames: list[Image.Image], cfg: VisionConfig) -> np.ndarray:
    """Resize (bicubic) + rescale + normalise equal-sized RGB frames -> (F, 3, H', W') float32."""
    w0, h0 = frames[0].size
    h, w = smart_resize(h0, w0, cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    out = np.empty((len(frames), 3, h, w), dtype=np.float32)
    for i, im in enumerate(frames):
        arr = np.asarray(im.resize((w, h), resample=Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        # rescale in float64 then cast, normalise in float32: the reference's exact rounding
        out[i] = ((arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32) - mean) / std
    return out


def process_image(image, cfg: VisionConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> ((gh*gw, 1176) float32 patch rows, (1, gh, gw)).

    Example:
        >>> rows, thw = process_image("cat.jpg", VisionConfig(max_pixels=28 * 28 * 16))
    """
    return patchify(_normalize([to_rgb(image)], cfg), cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)


def process_video(video: Video, cfg: VisionConfig) -> tuple[np.ndarray, tuple[int, int, int], float]:
    """Decoded video -> ((gt*gh*gw, 1176) patch rows, (gt, gh, gw), seconds per temporal grid step).

    Example:
        >>> rows, thw, sec = process_video(load_video("clip.mp4"), VisionConfig())
    """
    frames = [Image.fromarray(f) for f in video.frames]
    rows, grid = patchify(_normalize(frames, cfg), cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    return rows, grid, cfg.temporal_patch_size / video.sampled_fps


class Qwen2_5_VLProcessor:
    """Text + images + videos -> model inputs, with the keys/shapes of transformers' processor.

    Example:
        >>> proc = Qwen2_5_VLProcessor.from_pretrained("path/to/Qwen2.5-VL-3B-Instruct")
        >>> msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        >>> batch = proc(proc.apply_chat_template(msgs), images=["cat.jpg"])
        >>> proc.batch_decode(batch["input_ids"], skip_special_tokens=True)
    """

    def __init__(
        self, tokenizer, image_cfg: VisionConfig, video_cfg: VisionConfig, chat_template: str | None
    ):
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg
        self.video_cfg = video_cfg
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        for tok, tid in ((IMAGE_TOKEN, self.image_token_id), (VIDEO_TOKEN, self.video_token_id)):
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {tok} token; is this a Qwen2-VL / Qwen2.5-VL tokenizer?")
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
    ) -> Qwen2_5_VLProcessor:
        """Load tokenizer, chat template and pixel settings from a Hugging Face Qwen2.5-VL folder.

        `min_pixels`/`max_pixels` override the image and video budgets; `fps`/`max_frames` the video
        sampling. Example: `Qwen2_5_VLProcessor.from_pretrained("ckpt/", max_pixels=448 * 448)`.
        """
        from transformers import AutoTokenizer

        path = Path(path)
        pre = path / "preprocessor_config.json"
        if not pre.is_file():
            raise FileNotFoundError(
                f"{pre} not found; a Qwen2.5-VL folder needs preprocessor_config.json (copy it from the "
                "original checkpoint)"
            )
        if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (or vocab.json + merges.txt)")
        image_cfg = VisionConfig.from_json(pre)
        vpre = path / "video_preprocessor_config.json"
        video_cfg = (
            VisionConfig.from_json(vpre, base=image_cfg)
            if vpre.is_file()
            else VisionConfig(**vars(image_cfg))
        )
        for cfg in (image_cfg, video_cfg):
            cfg.min_pixels = min_pixels or cfg.min_pixels
            cfg.max_pixels = max_pixels or cfg.max_pixels
        video_cfg.fps = fps or video_cfg.fps
        video_cfg.max_frames = max_frames or video_cfg.max_frames
        image_cfg.validate("min_pixels/max_pixels")
        video_cfg.validate("fps/max_frames")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # tokenizers' own errors carry no file name
            raise ValueError(
                f"{path}: the tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt) "
                f"cannot be read ({type(e).__name__}: {e}); copy them again from the original checkpoint"
            ) from e
        template = _read_chat_template(path)
        _check_template(template or getattr(tokenizer, "chat_template", None), path)
        return cls(tokenizer, image_cfg, video_cfg, template)

    # -------------------------------------------------------------------------------------------- text
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a conversation with the folder's chat template (returns text, not ids).

        Content may be a string or a list of {"type": "image"|"video"|"text", ...} parts. Example:
            >>> proc.apply_chat_template([{"role": "user", "content": "Hi"}])
        """
        if not self.chat_template:
            raise ValueError(
                "this tokenizer folder has no chat template (chat_template.json / tokenizer_config.json)"
            )
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Token ids (list or 1-D tensor) -> text. Example: `proc.decode(out[0], skip_special_tokens=True)`."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """(B, L) ids -> B texts. Example: `proc.batch_decode(gen_ids, skip_special_tokens=True)`."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in ids]

    def num_tokens(self, grid_thw: Sequence[int]) -> int:
        """LLM placeholder tokens for one image/video grid (t*h*w / merge^2). Example: `num_tokens((1, 4, 6))` -> 6."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.image_cfg.merge_size**2

    def expand_placeholders(
        self, texts: list[str], image_grids: Sequence[Sequence[int]], video_grids: Sequence[Sequence[int]]
    ) -> list[str]:
        """Repeat each <|image_pad|>/<|video_pad|> to its token count, consuming grids in order.

        Raises ValueError naming the sample when the texts hold more or fewer placeholders than
        there are images/videos. Example: `proc.expand_placeholders([prompt], [(1, 4, 6)], [])`.
        """
        grids = {IMAGE_TOKEN: list(image_grids), VIDEO_TOKEN: list(video_grids)}
        for tok, kind in ((IMAGE_TOKEN, "image"), (VIDEO_TOKEN, "video")):
            counts = [t.count(tok) for t in texts]
            if sum(counts) != len(grids[tok]):
                # name the first sample whose placeholders run past the media list (or the last one)
                seen, bad = 0, len(texts) - 1
                for i, c in enumerate(counts):
                    seen += c
                    if seen > len(grids[tok]):
                        bad = i
                        break
                raise ValueError(
                    f"sample {bad}: the text(s) hold {sum(counts)} {tok} placeholder(s) (per sample {counts}) "
                    f"but {len(grids[tok])} {kind}(s) were passed; use one "
                    f"'<|vision_start|>{tok}<|vision_end|>' per {kind}"
                )
        k = {IMAGE_TOKEN: 0, VIDEO_TOKEN: 0}

        def repl(m: re.Match) -> str:
            tok = m.group(0)
            g = grids[tok][k[tok]]
            k[tok] += 1
            return tok * self.num_tokens(g)

        return [_PLACEHOLDER_RE.sub(repl, t) for t in texts]

    # --------------------------------------------------------------------------------------- __call__
    def __call__(
        self,
        text: str | list[str],
        images: Sequence | None = None,
        videos: Sequence | None = None,
        padding_side: str = "left",
        padding: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Build a batch: input_ids, attention_mask, mm_token_type_ids (+ pixel/grid tensors).

        `images`: PIL images, uint8 (H, W, 3) arrays or paths, in order of their placeholders across
        the batch. `videos`: paths (decoded at the video fps), `Video` objects, or uint8 (F, H, W, 3)
        frame arrays taken as already sampled at the processor's fps.
        Returns pixel_values (N, 1176) + image_grid_thw (num_images, 3) when there are images,
        pixel_values_videos + video_grid_thw + second_per_grid_ts (num_videos,) when there are videos.
        Example:
            >>> batch = proc([prompt_a, prompt_b], images=[img_a, img_b], padding_side="left")
        """
        texts = [text] if isinstance(text, str) else list(text)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: use 'left' or 'right'")
        out: dict[str, torch.Tensor] = {}
        image_grids, video_grids = [], []
        if images:
            rows = []
            for img in images:
                r, g = process_image(img, self.image_cfg)
                rows.append(r)
                image_grids.append(g)
            out["pixel_values"] = torch.from_numpy(np.concatenate(rows))
            out["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
        if videos:
            rows, seconds = [], []
            for vid in videos:
                r, g, s = process_video(self._as_video(vid), self.video_cfg)
                rows.append(r)
                video_grids.append(g)
                seconds.append(s)
            out["pixel_values_videos"] = torch.from_numpy(np.concatenate(rows))
            out["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
            out["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        expanded = self.expand_placeholders(texts, image_grids, video_grids)
        enc = self.tokenizer(expanded, padding=padding, padding_side=padding_side, return_tensors="pt")
        ids = enc["input_ids"]
        types = torch.zeros_like(ids)
        types[ids == self.image_token_id] = 1
        types[ids == self.video_token_id] = 2
        return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": types, **out}

    def _as_video(self, vid) -> Video:
        cfg = self.video_cfg
        if isinstance(vid, Video):
            return vid
        if isinstance(vid, (str, Path)):
            return load_video(vid, cfg.fps, cfg.max_frames, cfg.min_frames, cfg.temporal_patch_size)
        frames = vid.cpu().numpy() if isinstance(vid, torch.Tensor) else np.asarray(vid)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"video frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        return Video(frames=frames, sampled_fps=cfg.fps, indices=list(range(len(frames))))


def check_placeholders(
    input_ids: torch.Tensor,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    merge_size: int = 2,
    name: str = "sample",
) -> None:
    """Raise a clear ValueError when a sequence's placeholder tokens don't match its image/video features.

    `input_ids` is one sample (L,) or a batch (B, L) whose grids are listed in order. Example:
        >>> check_placeholders(ids, proc.image_token_id, proc.video_token_id, image_grid_thw=grid, name="item 7")
    """
    for tok, grid, kind in (
        (image_token_id, image_grid_thw, "image"),
        (video_token_id, video_grid_thw, "video"),
    ):
        have = int((input_ids == tok).sum())
        need = 0 if grid is None or len(grid) == 0 else int(grid.prod(-1).sum()) // merge_size**2
        if have != need:
            n = 0 if grid is None else len(grid)
            raise ValueError(
                f"{name}: {have} {kind} placeholder tokens but {n} {kind}(s) with features for {need} tokens; "
                f"the text and the {kind} list disagree (re-run the processor on this sample)"
            )


def _check_template(template: str | None, path: Path) -> None:
    """A chat template that does not compile is an error naming the folder now, not at the first turn."""
    if not isinstance(template, str):
        return
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateError as e:
        raise ValueError(
            f"{path}: the chat template (chat_template.jinja / chat_template.json / tokenizer_config.json) "
            f"does not compile ({e}); copy it again from the original checkpoint"
        ) from e


def _read_chat_template(path: Path) -> str | None:
    """The folder's chat template: chat_template.jinja, else chat_template.json, else None (tokenizer's)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        try:
            return json.loads((path / "chat_template.json").read_text()).get("chat_template")
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path / 'chat_template.json'}: not a valid chat template file ({e})") from e
    return None
