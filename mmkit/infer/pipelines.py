"""`load_pipeline`: a model folder -> the matching mmkit inference object, through the family registry.

The folder's family is recognised from its own files (`registry.detect`); the family's spec names its
loader (`FamilySpec.pipeline`): a generation pipeline for video DiTs (`WanT2VPipeline`, ...), a
`ChatSession` for vision-language models.
"""

from __future__ import annotations

import inspect


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


def check_conditioning(path, images: list | None, num_frames: int | None, mask_type: str | None) -> None:
    """Check i2v conditioning inputs against the folder's family before anything loads: the family's own
    rule where its loader has one (`check_conditioning`), else only that no mask type is asked for.

    Example: `check_conditioning("osp-i2v", ["a.png", "b.png"], 29, "transition")`.
    """
    from mmkit import registry

    spec = registry.detect(path)
    check = getattr(spec.resolve("pipeline"), "check_conditioning", None)
    if check is not None:
        check(images, num_frames, mask_type)
    elif mask_type is not None:
        raise ValueError(f"--mask-type {mask_type}: {spec.title} i2v takes no mask type; drop --mask-type")


def load_pipeline(path, task: str | None = None, device="auto", dtype="fp32", parallel=None):
    """Load a Hugging Face folder as the mmkit pipeline of its family; `task` defaults to the family's first.

    `parallel` (`infer.parallel.InferenceParallel`, video families): sequence / CFG parallelism and memory
    options; call inside an initialised process group when it spans several processes.
    Example: `pipe = load_pipeline("Wan2.1-T2V-1.3B-Diffusers", task="t2v", device="cuda", dtype="bf16")`.
    """
    from mmkit import registry

    spec = registry.detect(path)  # a missing folder or one without HF config files: FileNotFoundError
    task = spec.tasks[0] if task is None else task
    if task not in spec.tasks:
        raise ValueError(f"task={task!r}: choose one of {', '.join(spec.tasks)} ({spec.title})")
    if parallel is None:
        return spec.resolve("pipeline")(path, task=task, device=device, dtype=dtype)
    if task not in ("t2v", "i2v"):
        raise ValueError(
            f"parallel=...: multi-process generation is for video tasks (t2v, i2v), not task={task!r}"
        )
    loader = spec.resolve("pipeline")
    if "parallel" not in inspect.signature(loader).parameters:
        raise ValueError(
            f"parallel=...: multi-process and memory options are not available for {spec.title} yet; "
            "run it in one process without --ulysses-size/--ring-size/--cfg-size/--prompts/--dit-fsdp/..."
        )
    return loader(path, task=task, device=device, dtype=dtype, parallel=parallel)
