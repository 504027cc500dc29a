"""`load_pipeline`: a model folder -> the matching mmkit inference object, through the family registry.

The folder's family is recognised from its own files (`registry.detect`); the family's spec names its
loader (`FamilySpec.pipeline`): a generation pipeline for video DiTs (`WanT2VPipeline`, ...), a
`ChatSession` for vision-language models.
"""

from __future__ import annotations


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
    return spec.resolve("pipeline")(path, task=task, device=device, dtype=dtype, parallel=parallel)
