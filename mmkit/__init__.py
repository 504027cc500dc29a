"""mmkit: train, convert and serve multimodal models (video DiTs and VLMs) on any PyTorch device."""

__version__ = "0.1.0"


def load_pipeline(path, task: str | None = None, device="auto", dtype="fp32", parallel=None):
    """Load a Hugging Face folder as the mmkit pipeline of its model family (a Wan2.1 diffusers folder:
    the t2v / i2v pipeline; a Qwen2.5-VL folder: a `ChatSession`). `parallel`: an `InferenceParallel`
    (sequence / CFG parallelism, sharded weights, VAE tiling), inside an initialised process group.

    Example: `pipe = mmkit.load_pipeline("Wan2.1-T2V-1.3B-Diffusers", task="t2v", dtype="bf16")`.
    """
    from mmkit.infer.pipelines import load_pipeline as _load

    return _load(path, task=task, device=device, dtype=dtype, parallel=parallel)


def __getattr__(name: str):
    # `mmkit.InferenceParallel` without importing torch when mmkit is imported
    if name == "InferenceParallel":
        from mmkit.infer.parallel import InferenceParallel

        return InferenceParallel
    raise AttributeError(f"module 'mmkit' has no attribute {name!r}")


def load_vlm(path, device="auto", dtype="fp32"):
    """Load a Qwen2.5-VL transformers-layout folder; returns `(model, processor)`.

    Example: `model, processor = mmkit.load_vlm("Qwen2.5-VL-7B-Instruct", dtype="bf16")`.
    """
    from mmkit.models.qwen2_5_vl.load import load_vlm as _load

    return _load(path, device=device, dtype=dtype)
