"""`load_pipeline`: a model folder + task -> the matching mmkit generation pipeline."""

from __future__ import annotations

from pathlib import Path

TASKS = ("t2v", "i2v")


def load_pipeline(path, task: str = "t2v", device="auto", dtype="fp32"):
    """Load a diffusers-layout Wan2.1 folder as an mmkit pipeline (`task` = "t2v" or "i2v").

    Example: `pipe = load_pipeline("Wan2.1-T2V-1.3B-Diffusers", task="t2v", device="cuda", dtype="bf16")`.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: choose one of {', '.join(TASKS)}")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if task == "t2v":
        from mmkit.infer.t2v import WanT2VPipeline

        return WanT2VPipeline.from_pretrained(path, device=device, dtype=dtype)
    from mmkit.infer.i2v import WanI2VPipeline

    return WanI2VPipeline.from_pretrained(path, device=device, dtype=dtype)
