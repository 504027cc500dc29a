"""`mmkit generate t2v|i2v`: text/image-to-video from a model folder (Wan2.1, OpenSoraPlan 1.3).

Options left out take the family pipeline's defaults (Wan: 480x832, 81 frames, 50 steps, CFG 5; OpenSoraPlan:
352x640, 93 frames, 100 steps, CFG 7.5, the release's negative prompt and scheduler).

Example:
    mmkit generate t2v --model Wan2.1-T2V-1.3B-Diffusers --prompt "a red circle moves left" \
        --height 480 --width 832 --frames 33 --steps 30 --guidance 5 --seed 0 --dtype bf16 --out out.mp4
"""

from __future__ import annotations

import math
from pathlib import Path

from mmkit.cli.generate_parallel import add_parallel_arguments, run_parallel, wants_parallel
from mmkit.device import resolve_device, resolve_dtype
from mmkit.infer.media import VIDEO_SUFFIXES, frame_grid, load_image, save_video
from mmkit.outputs import check_output_file


def add_arguments(p) -> None:
    p.add_argument("task", choices=["t2v", "i2v"])
    p.add_argument("--model", required=True, help="diffusers-layout folder (model_index.json)")
    p.add_argument("--prompt", help="the prompt (or --prompts FILE)")
    p.add_argument("--negative-prompt", default=None, help="default: the family's (Wan: empty)")
    p.add_argument(
        "--image",
        action="append",
        help="i2v conditioning image; repeat it for OpenSoraPlan (2 = first and last frame: transition)",
    )
    p.add_argument(
        "--mask-type",
        choices=["t2iv", "i2v", "transition", "continuation", "clear", "random_temporal"],
        help="OpenSoraPlan i2v: which frames the --image inputs give (default: from their count)",
    )
    p.add_argument("--height", type=int, default=None, help="default: the family's (Wan 480)")
    p.add_argument("--width", type=int, default=None, help="default: the family's (Wan 832)")
    p.add_argument("--frames", type=int, default=None, help="4k+1 frames (default: the family's, Wan 81)")
    p.add_argument("--steps", type=int, default=None, help="default: the family's (Wan 50)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale >= 0; <= 1 turns it off (default: the family's, Wan 5.0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--flow-shift", type=float, help="override the scheduler's flow shift (3.0 for 480p, 5.0 for 720p)"
    )
    p.add_argument("--sampler", choices=["unipc", "euler"], default=None, help="Wan only (default unipc)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32")
    p.add_argument(
        "--out", required=True, help="output .mp4 (16 fps, plus a .png grid beside it), .npy or .png"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    c = p.add_argument_group("acceleration")
    c.add_argument("--cache", choices=["none", "dit", "attention", "adaptive"], default="none")
    c.add_argument(
        "--cache-config", help="cache JSON ({'method': ..., fields}; `mmkit accel search` writes one)"
    )
    c.add_argument(
        "--cache-threshold", type=float, help="adaptive threshold (0.01 calibrated; 0.005 uncalibrated)"
    )
    c.add_argument("--cache-calibration", help="adaptive cache calibration JSON (`mmkit accel calibrate`)")
    c.add_argument(
        "--attention-backend", default="sdpa", help="sdpa (default), auto, static, or a kernel name"
    )
    # MindIE spellings of AttentionCache
    c.add_argument("--use_attentioncache", action="store_true", help="= --cache attention")
    c.add_argument("--start_step", type=int, help="cache step_start")
    c.add_argument("--attentioncache_interval", type=int, help="cache step_interval")
    c.add_argument("--end_step", type=int, help="cache step_end")
    add_parallel_arguments(p)


def precheck(a) -> None:
    """Every argument error, before any weights are read: flags, the image, the output path, the model
    folder's files, and the memory the generation needs (refused beyond the device's, warned near it)."""
    device = resolve_device(a.device)
    resolve_dtype(a.dtype)
    if a.prompt is None and not getattr(a, "prompts", None):
        raise ValueError("give --prompt TEXT (or --prompts FILE, one prompt per line)")
    if a.prompt is not None and not a.prompt.strip():
        raise ValueError("--prompt: is empty; describe the video to generate")
    if a.steps is not None and a.steps < 1:
        raise ValueError(f"--steps {a.steps}: must be >= 1")
    if a.guidance is not None and (not math.isfinite(a.guidance) or a.guidance < 0):
        raise ValueError(f"--guidance {a.guidance}: must be a finite number >= 0 (<= 1 disables guidance)")
    if a.flow_shift is not None and not (math.isfinite(a.flow_shift) and a.flow_shift > 0):
        raise ValueError(
            f"--flow-shift {a.flow_shift}: must be a finite number > 0 (3.0 for 480p, 5.0 for 720p)"
        )
    if Path(a.out).suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--out {a.out}: the suffix must be one of {', '.join(VIDEO_SUFFIXES)}")
    if a.frames is not None and ((a.frames - 1) % 4 or a.frames < 1):
        raise ValueError(f"--frames {a.frames}: must be 4k+1 (e.g. {max(1, (a.frames - 1) // 4 * 4 + 1)})")
    for name in ("height", "width"):
        if getattr(a, name) is not None and (getattr(a, name) % 16 or getattr(a, name) <= 0):
            raise ValueError(f"--{name} {getattr(a, name)}: must be a positive multiple of 16")
    if a.task == "t2v" and a.mask_type:
        raise ValueError(f"--mask-type {a.mask_type}: is for i2v; use `mmkit generate i2v` or drop it")
    if a.task == "i2v" and not a.image and a.mask_type != "t2iv":
        raise ValueError("i2v needs --image PATH (the first frame)")
    if a.task == "i2v":
        from mmkit.infer.pipelines import check_conditioning

        check_conditioning(a.model, a.image, a.frames, a.mask_type)  # the image count against the mask type
    if a.task == "t2v" and a.image:
        raise ValueError(f"--image {a.image}: t2v takes no image; use `mmkit generate i2v` or drop --image")
    for image in a.image or []:
        if Path(image).suffix.lower() in (".mp4", ".mov", ".avi", ".mkv", ".webm"):  # a clip to continue
            if not Path(image).is_file():
                raise FileNotFoundError(f"--image: file not found: {image}")
            continue
        load_image(image)  # decodable now, not after the weights load
    a.cache_configs = cache_configs(a)
    out = check_output_file(a.out, a.overwrite)
    if out.suffix.lower() == ".mp4":
        check_output_file(out.with_suffix(".png"), a.overwrite, flag="--out (its frame grid)")
    from mmkit.infer.budget import check_memory
    from mmkit.infer.pipelines import estimate_memory

    shape = {"height": a.height, "width": a.width, "num_frames": a.frames}
    shape = {k: v for k, v in shape.items() if v is not None} | {"dtype": a.dtype}  # None: the family's
    need = estimate_memory(a.model, task=a.task, **shape)
    if need is not None:
        check_memory(need, device, "this generation", "lower --height/--width/--frames or use --dtype bf16")


def cache_configs(a) -> list:
    """The cache configs the flags ask for (checked before any weights are read)."""
    from mmkit.infer.accel.cache import (
        AdaptiveCacheConfig,
        AttentionCacheConfig,
        DiTCacheConfig,
        load_cache_config,
    )
    from mmkit.models.common import attention_backends

    attention_backends.check_name(a.attention_backend, "--attention-backend")
    method = "attention" if a.use_attentioncache else a.cache
    if a.use_attentioncache and a.cache not in ("none", "attention"):
        raise ValueError(f"--use_attentioncache conflicts with --cache {a.cache}")
    if a.cache_config:
        cfg = load_cache_config(a.cache_config)
        if method not in ("none", cfg.method):
            raise ValueError(
                f"--cache {method} conflicts with --cache-config {a.cache_config} (method {cfg.method})"
            )
    elif method == "none":
        if a.cache_threshold is not None or a.start_step is not None:
            raise ValueError(
                "--cache-threshold / --start_step need a cache: add --cache adaptive|dit|attention"
            )
        return []
    else:
        cfg = {"dit": DiTCacheConfig, "attention": AttentionCacheConfig, "adaptive": AdaptiveCacheConfig}[
            method
        ]()
    for flag, field in (
        ("start_step", "step_start"),
        ("attentioncache_interval", "step_interval"),
        ("end_step", "step_end"),
    ):
        if getattr(a, flag) is not None:
            if not hasattr(cfg, field):
                raise ValueError(f"--{flag}: the {cfg.method} cache has no {field}")
            setattr(cfg, field, getattr(a, flag))
    if a.cache_threshold is not None or a.cache_calibration:
        if cfg.method != "adaptive":
            raise ValueError(
                f"--cache-threshold / --cache-calibration apply to the adaptive cache, not {cfg.method}"
            )
        if a.cache_threshold is not None:
            cfg.threshold = a.cache_threshold
        if a.cache_calibration:
            cfg.calibration = a.cache_calibration
    if cfg.method == "adaptive" and cfg.calibration is not None:
        from mmkit.infer.accel.cache.adaptive import transfer_note

        cfg.validate()  # reads the calibration file
        note = transfer_note(cfg.calibration, a.steps) if a.steps is not None else None
        if note:
            print(note)
    if cfg.method != "dit":  # DiTCache's block range is checked against the model when installed
        cfg.validate()
    return [cfg]


def run(a) -> int:
    if wants_parallel(a):  # torchrun, --prompts, or a memory option
        return run_parallel(a)
    precheck(a)
    from mmkit.infer.accel.cache import apply_cache, cache_stats
    from mmkit.infer.pipelines import load_pipeline
    from mmkit.models.common import attention_backends

    pipe = load_pipeline(a.model, task=a.task, device=a.device, dtype=a.dtype)
    attention_backends.configure(backend=a.attention_backend)
    if a.cache_configs:
        apply_cache(pipe.transformer, *a.cache_configs)
    out = pipe(a.prompt, seed=a.seed, **pipe_kwargs(a))
    save_outputs(out, a.out)
    if a.cache_configs:
        print(f"cache {a.cache_configs[0].method}: {cache_stats(pipe.transformer).summary()}")
    return 0


def pipe_kwargs(a) -> dict:
    """The pipeline call's keyword arguments from the flags; flags left out take the family's defaults."""
    given = dict(
        negative_prompt=a.negative_prompt,
        image=a.image[0] if a.image and len(a.image) == 1 else a.image,  # several: OpenSoraPlan i2v
        height=a.height,
        width=a.width,
        num_frames=a.frames,
        num_inference_steps=a.steps,
        guidance_scale=a.guidance,
        sampler=a.sampler,
        flow_shift=a.flow_shift,
        mask_type=getattr(a, "mask_type", None),
    )
    return {k: v for k, v in given.items() if v is not None}


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
