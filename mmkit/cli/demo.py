"""`mmkit demo` (behind `make demo`): build a tiny Wan2.1 t2v folder, generate a short video from it.

Writes OUT/wan-tiny (the model, diffusers layout), OUT/t2v.mp4 and OUT/t2v.png (frame grid), and
OUT/i2v.mp4 / OUT/i2v.png from the first t2v frame. Until the training issue lands, the weights
are random, so the video shows structured noise; what it demonstrates is the whole path a real
checkpoint takes (folder -> converter -> mmkit DiT -> sampler -> VAE -> mp4).
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, nargs=2, default=[64, 96], metavar=("H", "W"))


def run(a) -> int:
    from PIL import Image

    from mmkit.infer.media import save_video
    from mmkit.infer.pipelines import load_pipeline
    from mmkit.models.wan.tiny import create_tiny_wan

    out = Path(a.out)
    h, w = a.size
    written = []
    first = None
    for task in ("t2v", "i2v"):
        folder = create_tiny_wan(out / f"wan-tiny-{task}", task=task, seed=0)
        pipe = load_pipeline(folder, task=task, device="auto", dtype="fp32")
        prompt = "a red circle moves left on a black background"
        res = pipe(
            prompt, image=first, height=h, width=w, num_frames=a.frames, num_inference_steps=a.steps, seed=0
        )
        frames = res.frames[0]
        first = Image.fromarray((frames[0] * 255).round().astype("uint8"))
        for suffix in (".mp4", ".png"):
            written.append(save_video(frames, out / f"{task}{suffix}"))
        print(
            f"[{task}] {len(res.step_times)} steps at {sum(res.step_times) / len(res.step_times):.3f} s/step"
        )
    print("demo outputs:")
    for p in written:
        print(f"  {p}")
    return 0
