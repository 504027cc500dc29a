"""mmkit: train, convert and serve multimodal models (video DiTs and VLMs) on any PyTorch device."""

__version__ = "0.1.0"


def load_pipeline(path, task: str | None = None, device="auto", dtype="fp32"):
    """Load a Hugging Face folder as the mmkit pipeline of its model family (a Wan2.1 diffusers folder:
    the t2v / i2v pipeline; a Qwen2.5-VL folder: a `ChatSession`).

    Example: `pipe = mmkit.load_pipeline("Wan2.1-T2V-1.3B-Diffusers", task="t2v", dtype="bf16")`.
    """
    from mmkit.infer.pipelines import load_pipeline as _load

    return _load(path, task=task, device=device, dtype=dtype)


def load_vlm(path, device="auto", dtype="fp32"):
    """Load a Qwen2.5-VL transformers-layout folder; returns `(model, processor)`.

    Example: `model, processor = mmkit.load_vlm("Qwen2.5-VL-7B-Instruct", dtype="bf16")`.
    """
    from mmkit.models.qwen2_5_vl.load import load_vlm as _load

    return _load(path, device=device, dtype=dtype)
