"""Loading a Qwen2.5-VL folder for inference: the loader the family spec names (`FamilySpec.pipeline`)."""

from __future__ import annotations

from mmkit.infer.chat import ChatSession


def load_chat(path, task: str = "sft", device="auto", dtype="fp32") -> ChatSession:
    """A transformers-layout Qwen2.5-VL folder as a `ChatSession` (the model and its processor).

    Example: `chat = load_chat("Qwen2.5-VL-3B-Instruct", dtype="bf16"); chat.ask("Hi").text`.
    """
    from mmkit.models.qwen2_5_vl.load import load_vlm

    model, processor = load_vlm(path, device=device, dtype=dtype)
    return ChatSession(model, processor)
