"""Load a transformers-layout Qwen2.5-VL folder into mmkit: `load_model` and `load_vlm`."""

from __future__ import annotations

from pathlib import Path

import torch

from mmkit.device import resolve_device, resolve_dtype
from mmkit.models.common.hf_io import load_state_dict, read_json
from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mmkit.models.qwen2_5_vl.hf import from_hf
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel


def load_model(path: str | Path, device="auto", dtype="fp32") -> Qwen2_5_VLModel:
    """config.json + (sharded) safetensors -> an eval-mode `Qwen2_5_VLModel` on `device` in `dtype`.

    EOS ids come from generation_config.json when present (real Instruct folders list two there).
    Example: `model = load_model("Qwen2.5-VL-3B-Instruct", device="cuda", dtype="bf16")`.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    cfg = Qwen2_5_VLConfig.from_pretrained(path)
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        eos = read_json(gen_file, "generation config").get("eos_token_id")
        if eos is not None:
            cfg.eos_token_id = eos
    device, dtype = resolve_device(str(device)), resolve_dtype(dtype)
    with torch.device("meta"):
        model = Qwen2_5_VLModel(cfg)
    # Cast tensor by tensor while loading, so peak memory stays near one copy of the weights.
    sd = {k: v.to(device=device, dtype=dtype) for k, v in from_hf(load_state_dict(path), cfg).items()}
    if cfg.tie_word_embeddings:
        sd["language.lm_head.weight"] = sd["language.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the parameter objects; tie them again
        model.language.lm_head.weight = model.language.embed_tokens.weight
    return model.eval()


def load_vlm(path: str | Path, device="auto", dtype="fp32"):
    """(model, processor) from a Qwen2.5-VL folder; the processor is mmkit's `Qwen2_5_VLProcessor`.

    Example: `model, processor = load_vlm("Qwen2.5-VL-7B-Instruct", device="auto", dtype="bf16")`.
    """
    from mmkit.models.qwen2_5_vl.processor import Qwen2_5_VLProcessor

    model = load_model(path, device=device, dtype=dtype)
    return model, Qwen2_5_VLProcessor.from_pretrained(path)
