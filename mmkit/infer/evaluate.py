"""Prompt-fidelity evaluation on the synthetic shapes world, for `mmkit eval` and the demo.

- `eval_shapes(pipe, prompts, ...)`: generate one clip per prompt, measure it with the detector
  (`mmkit.data.synth_eval`), return per-attribute accuracy; optionally save mp4 + PNG grid per prompt.
- `shapes_qa_items(n)` / `eval_shapes_qa(chat, items)`: held-out shape images, one question of each
  kind (colour, shape, position, count) per image, exact-match accuracy of the VLM's answers.
- `contact_sheet(clips, captions, path)`: one PNG, a row of frames per clip with its caption under it.
- `caption_sensitivity(pipe, latents, captions)`: which caption words the DiT uses, from its flow loss on
  training latents with one attribute of the caption swapped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmkit.data.synth import QA_KINDS
from mmkit.data.synth_eval import ATTRIBUTES, Tally, detect, parse_caption

QA_EVAL_KINDS = QA_KINDS  # colour, shape, position, count: one question of each per held-out image


def heldout_prompts(model_dir: str | os.PathLike, n: int) -> list[str]:
    """The first `n` held-out prompts of a shapes model folder (`heldout_prompts.json`).

    Example: `heldout_prompts("/tmp/wan-shapes", 32)`.
    """
    path = Path(model_dir) / "heldout_prompts.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --model must be a shapes model folder (`mmkit create-tiny wan-shapes DIR`), "
            "or pass --prompts-file with a JSON list of captions never seen in training"
        )
    return take_prompts(json.loads(path.read_text()), n, str(path))


def take_prompts(prompts: list[str], n: int, where: str) -> list[str]:
    """The first `n` of `prompts`, each checked to be a caption the detector can judge.

    Example: `take_prompts(json.load(open("prompts.json")), 8, "prompts.json")`.
    """
    if not 1 <= n <= len(prompts):
        raise ValueError(
            f"--prompts {n}: {where} holds {len(prompts)} held-out prompts; use 1..{len(prompts)}"
        )
    for p in prompts[:n]:
        parse_caption(p)  # a clear error for a caption the detector cannot judge
    return list(prompts[:n])


@dataclass
class ShapesEval:
    """Per-attribute accuracy, what was detected per prompt, and the generated clips (T, H, W, 3)."""

    accuracy: dict[str, float]
    prompts: list[str]
    detected: list[dict[str, str]]
    clips: list[np.ndarray] = field(repr=False, default_factory=list)
    seconds: float = 0.0


def eval_shapes(
    pipe,
    prompts: list[str],
    steps: int = 50,
    guidance: float = 5.0,
    height: int = 64,
    width: int = 64,
    num_frames: int = 17,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> ShapesEval:
    """Generate prompt i with seed `seed + i`, detect what each clip shows, score it against the prompt.

    With `out`, writes `NN.mp4`, `NN.png` (frame grid) and `NN.txt` (prompt) per prompt.
    Example: `eval_shapes(load_pipeline("/tmp/wan-shapes", task="t2v"), prompts[:4]).accuracy`.
    """
    import time

    from mmkit.infer.media import save_video

    tally, detected, clips = Tally(), [], []
    t0 = time.perf_counter()
    bar = tqdm(prompts, desc="eval shapes", unit="prompt", disable=not progress)
    for i, prompt in enumerate(bar):
        res = pipe(
            prompt, height=height, width=width, num_frames=num_frames, num_inference_steps=steps,
            guidance_scale=guidance, seed=seed + i, progress=False,
        )  # fmt: skip
        frames = res.frames[0]  # (T, H, W, 3) in [0, 1]
        seen, truth = detect(frames), parse_caption(prompt)
        tally.add({k: seen[k] == truth[k] for k in ATTRIBUTES})
        detected.append(seen)
        clips.append(frames)
        bar.set_postfix({k[:3]: f"{v:.0%}" for k, v in tally.accuracy().items()})
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            save_video(frames, Path(out) / f"{i:02d}.mp4")
            save_video(frames, Path(out) / f"{i:02d}.png")
            (Path(out) / f"{i:02d}.txt").write_text(prompt + "\n")
    return ShapesEval(tally.accuracy(), list(prompts), detected, clips, time.perf_counter() - t0)


def contact_sheet(
    clips: list[np.ndarray], captions: list[str], path: str | os.PathLike, frames: int = 5, scale: int = 2
) -> Path:
    """One PNG: per clip a row of `frames` evenly spaced frames, upscaled `scale`x, its caption below.

    Example: `contact_sheet(result.clips, result.prompts, "out/contact_sheet.png")`.
    """
    from PIL import Image, ImageDraw, ImageFont

    if len(clips) != len(captions) or not clips:
        raise ValueError(f"contact_sheet: {len(clips)} clips and {len(captions)} captions; give one each")
    strips = []
    for clip in clips:
        c = np.asarray(clip, np.float32)
        idx = np.linspace(0, len(c) - 1, min(frames, len(c))).round().astype(int)
        row = np.concatenate([c[i] for i in idx], axis=1)  # (H, frames * W, 3)
        u8 = (np.clip(row, 0, 1) * 255).round().astype(np.uint8)
        strips.append(Image.fromarray(u8).resize((u8.shape[1] * scale, u8.shape[0] * scale), Image.NEAREST))
    font = ImageFont.load_default()
    text_h, gap = 16, 6
    w = max(s.width for s in strips)
    sheet = Image.new("RGB", (w, sum(s.height + text_h + gap for s in strips)), (255, 255, 255))
    draw, y = ImageDraw.Draw(sheet), 0
    for strip, cap in zip(strips, captions):
        sheet.paste(strip, (0, y))
        draw.text((4, y + strip.height + 2), cap, fill=(0, 0, 0), font=font)
        y += strip.height + text_h + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


@dataclass
class QAItem:
    """One held-out question: the image (PIL), the question, the true answer and its kind."""

    image: object
    question: str
    answer: str
    kind: str


def shapes_qa_items(n: int, size: int, seed: int, workdir: str | os.PathLike) -> list[QAItem]:
    """`n` held-out images (seed `seed`, never the training seed), one colour, shape, position and
    count question each. Example: `shapes_qa_items(10, 112, 1000, "/tmp/qa_eval")`."""
    from PIL import Image

    from mmkit.data.synth import synth_shapes_qa

    root = Path(workdir)
    qa = synth_shapes_qa(root, images=n, size=size, turns=len(QA_EVAL_KINDS), seed=seed, progress=False)
    items = []
    for rec in json.loads(qa.read_text()):
        image = Image.open(root / rec["images"][0]).convert("RGB")
        msgs = rec["messages"]
        for q, a in zip(msgs[::2], msgs[1::2]):
            question = q["content"].replace("<image>", "")
            kind = _kind(question)
            if kind in QA_EVAL_KINDS:
                items.append(QAItem(image, question, a["content"], kind))
    return items


def _kind(question: str) -> str:
    if question.startswith("What color"):
        return "color"
    if question.startswith("What shape"):
        return "shape"
    if question.startswith("Where"):
        return "position"
    return "count"


def eval_shapes_qa(chat, items: list[QAItem], progress: bool = True) -> tuple[dict[str, float], list[str]]:
    """Ask each item as a fresh single-turn chat; (exact-match accuracy per kind, the answers).

    Example: `acc, answers = eval_shapes_qa(ChatSession(model, processor), shapes_qa_items(...))`.
    """
    hits = dict.fromkeys(QA_EVAL_KINDS, 0)
    totals = dict.fromkeys(QA_EVAL_KINDS, 0)
    answers = []
    for item in tqdm(items, desc="eval shapes-qa", unit="question", disable=not progress):
        chat.reset()
        reply = chat.ask(item.question, images=[item.image]).text.strip().lower().rstrip(".")
        answers.append(reply)
        hits[item.kind] += int(reply == item.answer)
        totals[item.kind] += 1
    return {k: hits[k] / totals[k] for k in QA_EVAL_KINDS if totals[k]}, answers


def swap_attribute(prompt: str, key: str) -> str:
    """`prompt` with its `key` attribute replaced by the next value of the grammar (cyclic); directions
    go to the opposite one. Example: `swap_attribute("a red circle moves left on a black background",
    "direction")` -> "a red circle moves right on a black background"."""
    from mmkit.data.synth import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, caption

    truth = parse_caption(prompt)
    if key == "direction":
        dx, dy = DIRECTIONS[truth[key]]
        truth[key] = next(d for d, v in DIRECTIONS.items() if v == (-dx, -dy))
    else:
        names = list({"color": COLORS, "shape": SHAPES, "background": BACKGROUNDS}[key])
        truth[key] = names[(names.index(truth[key]) + 1) % len(names)]
    return caption(truth["color"], truth["shape"], truth["direction"], truth["background"])


def caption_sensitivity(
    pipe, latents, captions: list[str], sigmas=(0.5, 0.7, 0.85, 0.95), seed: int = 0
) -> dict[float, dict[str, float]]:
    """The DiT's flow-matching loss on clean training `latents` (B, C, T, H, W) noised to each sigma,
    with the true captions and with one attribute swapped (`swap_attribute`) or the empty prompt:
    {sigma: {"true": loss, "color": ..., "shape": ..., "direction": ..., "background": ..., "null": ...}}.

    A word the model uses costs loss when it is swapped (colour doubles it on the shapes model); a
    swap that costs nothing is a word the model ignores. The noise is the same for every caption.
    Example: `caption_sensitivity(load_pipeline(d, task="t2v"), feats["latents"][:32], caps[:32])`.
    """
    import torch

    x0 = latents.float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    variants = {"true": list(captions)}
    variants.update({k: [swap_attribute(c, k) for c in captions] for k in ATTRIBUTES})
    variants["null"] = [""] * len(captions)
    ctx = {k: pipe.encode_prompt(v) for k, v in variants.items()}
    out = {}
    with torch.no_grad():
        for s in sigmas:
            xt, target = (1 - s) * x0 + s * noise, noise - x0
            t = torch.full((x0.shape[0],), s * 1000.0)
            out[s] = {
                k: float((pipe.transformer(xt, t, c, None) - target).pow(2).mean()) for k, c in ctx.items()
            }
    return out
