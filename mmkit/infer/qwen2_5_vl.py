"""Loading a Qwen2.5-VL folder for inference: the loader the family spec names (`FamilySpec.pipeline`)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from mmkit.device import resolve_dtype
from mmkit.infer.budget import kv_cache_bytes
from mmkit.infer.chat import ChatSession
from mmkit.models.common.hf_io import check_safetensors, find_weight_files


def load_chat(path, task: str = "sft", device="auto", dtype="fp32") -> ChatSession:
    """A transformers-layout Qwen2.5-VL folder as a `ChatSession` (the model and its processor).

    Example: `chat = load_chat("Qwen2.5-VL-3B-Instruct", dtype="bf16"); chat.ask("Hi").text`.
    """
    from mmkit.models.qwen2_5_vl.load import load_vlm

    model, processor = load_vlm(path, device=device, dtype=dtype)
    return ChatSession(model, processor)


def chat_budget(
    path, max_new_tokens: int, dtype="fp32", prompt_tokens: int = 1024
) -> tuple[int, dict[str, int]]:
    """(max_new_tokens capped to the model's context, {part: peak bytes}) from config.json and the
    safetensors headers only; damaged weight files are named here, before anything loads.

    The KV cache is preallocated for prompt + new tokens, so an unbounded `max_new_tokens` would
    allocate for tokens the model can never attend to: it is capped with a warning. `prompt_tokens` is
    a guess of the prompt's length (the processor has not run yet).
    Example: `n, need = chat_budget("Qwen2.5-VL-3B-Instruct", 100_000, "bf16")`.
    """
    from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    cfg = Qwen2_5_VLConfig.from_pretrained(folder)
    context = cfg.text.max_position_embeddings
    if max_new_tokens > context:
        warnings.warn(
            f"max_new_tokens={max_new_tokens} is more than the model's context ({context} tokens, "
            f"config.json max_position_embeddings); capped to {context}",
            stacklevel=2,
        )
        max_new_tokens = context
    nbytes = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    params = sum(
        math.prod(t["shape"]) for f in find_weight_files(folder) for t in check_safetensors(f).values()
    )
    t = cfg.text
    tokens = min(context, prompt_tokens + max_new_tokens)
    return max_new_tokens, {
        "weights": params * nbytes,
        "KV cache": kv_cache_bytes(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, tokens, nbytes),
        # prefill: hidden states and the MLP's intermediate for the whole prompt, plus fp32 logits
        "prefill": tokens * (4 * t.hidden_size + 2 * t.intermediate_size) * nbytes + t.vocab_size * 4 * 2,
    }
