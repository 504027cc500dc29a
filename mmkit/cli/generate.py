"""`mmkit generate t2v|i2v`: text/image-to-video from a diffusers-layout Wan2.1 folder.

Example:
    mmkit generate t2v --model Wan2.1-T2V-1.3B-Diffusers --prompt "a red circle moves left" \
        --height 480 --width 832 --frames 33 --steps 30 --guidance 5 --seed 0 --dtype bf16 --out out.mp4
"""

from __future__ import annotations

from pathlib import Path

from mmkit.cli.generate_parallel import add_parallel_arguments, run_parallel, wants_parallel
from mmkit.device import resolve_device, resolve_dtype
from mmkit.infer.media import VIDEO_SUFFIXES, frame_grid, save_video


def add_arguments(p) -> None:
    p.add_argument("task", choices=["t2v", "i2v"])
    p.add_argument("--model", required=True, help="diffusers-layout folder (model_index.json)")
    p.add_argument("--prompt", help="the prompt (or --prompts FILE)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--image", help="first frame (i2v)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81, help="4k+1 frames")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--flow-shift", type=float, help="override the scheduler's flow shift (3.0 for 480p, 5.0 for 720p)"
    )
    p.add_argument("--sampler", choices=["unipc", "euler"], default="unipc")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32")
    p.add_argument(
        "--out", required=True, help="output .mp4 (16 fps, plus a .png grid beside it), .npy or .png"
    )
    add_parallel_arguments(p)


def precheck(a) -> None:
    """Every argument error, before any weights are read."""
    resolve_device(a.device), resolve_dtype(a.dtype)
    if not a.prompt and not a.prompts:
        raise ValueError("give --prompt TEXT (or --prompts FILE, one prompt per line)")
    if Path(a.out).suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--out {a.out}: the suffix must be one of {', '.join(VIDEO_SUFFIXES)}")
    if (a.frames - 1) % 4 or a.frames < 1:
        raise ValueError(f"--frames {a.frames}: must be 4k+1 (e.g. {max(1, (a.frames - 1) // 4 * 4 + 1)})")
    for name in ("height", "width"):
        if getattr(a, name) % 16 or getattr(a, name) <= 0:
            raise ValueError(f"--{name} {getattr(a, name)}: must be a positive multiple of 16")
    if a.task == "i2v" and not a.image:
        raise ValueError("i2v needs --image PATH (the first frame)")
    if a.image and not Path(a.image).is_file():
        raise FileNotFoundError(f"--image: file not found: {a.image}")


def run(a) -> int:
    if wants_parallel(a):  # torchrun, --prompts, or a memory option
        return run_parallel(a)
    precheck(a)
    from mmkit.infer.pipelines import load_pipeline

    pipe = load_pipeline(a.model, task=a.task, device=a.device, dtype=a.dtype)
    out = pipe(
        a.prompt,
        negative_prompt=a.negative_prompt,
        image=a.image,
        height=a.height,
        width=a.width,
        num_frames=a.frames,
        num_inference_steps=a.steps,
        guidance_scale=a.guidance,
        seed=a.seed,
        sampler=a.sampler,
        flow_shift=a.flow_shift,
    )
    save_outputs(out, a.out)
    return 0


def save_outputs(out, dest) -> None:
    """Write a `VideoOutput`'s first video to `dest` (+ a PNG frame grid beside an .mp4) and report."""
    frames = out.frames[0]  # (T, H, W, 3)
    path = save_video(frames, dest)
    steps = out.step_times
    print(f"{len(steps)} steps, {sum(steps) / len(steps):.3f} s/step (total {sum(steps):.1f} s)")
    print(f"wrote {path}")
    if path.suffix == ".mp4":
        grid = save_video(frames, path.with_suffix(".png"))
        print(f"wrote {grid} (frame grid {frame_grid(frames).shape[1]}x{frame_grid(frames).shape[0]})")
