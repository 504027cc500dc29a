"""`load_pipeline`: a model folder -> the matching mmkit inference object, through the family registry.

The folder's family is recognised from its own files (`registry.detect`); the family's spec names its
loader (`FamilySpec.pipeline`): a generation pipeline for video DiTs (`WanT2VPipeline`, ...), a
`ChatSession` for vision-language models.
"""

from __future__ import annotations


def estimate_memory(path, task: str | None = None, **shape) -> dict[str, int] | None:
    """Peak bytes of one call of the folder's pipeline, by part, from its configs and weight headers
    (nothing loads); None when the family's loader has no estimate. `shape`: the call's sizes.

    Example: `estimate_memory("Wan2.1-T2V-1.3B-Diffusers", "t2v", height=480, width=832, num_frames=81)`.
    """
    from mmkit import registry

    spec = registry.detect(path)
    task = spec.tasks[0] if task is None else task
    estimate = getattr(spec.resolve("pipeline"), "estimate_memory", None)
    return None if estimate is None else estimate(path, task=task, **shape)


def load_pipeline(path, task: str | None = None, device="auto", dtype="fp32"):
    """Load a Hugging Face folder as the mmkit pipeline of its family; `task` defaults to the family's first.

    Example: `pipe = load_pipeline("Wan2.1-T2V-1.3B-Diffusers", task="t2v", device="cuda", dtype="bf16")`.
    """
    from mmkit import registry

    spec = registry.detect(path)  # a missing folder or one without HF config files: FileNotFoundError
    task = spec.tasks[0] if task is None else task
    if task not in spec.tasks:
        raise ValueError(f"task={task!r}: choose one of {', '.join(spec.tasks)} ({spec.title})")
    return spec.resolve("pipeline")(path, task=task, device=device, dtype=dtype)
