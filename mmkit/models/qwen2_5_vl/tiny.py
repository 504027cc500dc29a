"""A tiny random Qwen2.5-VL folder in the exact transformers layout, for tests, demos and benchmarks.

Writes config.json, generation_config.json, sharded safetensors + model.safetensors.index.json (always
more than one shard), and the tokenizer / chat template / preprocessor files (built by
`tokenizer.build_tiny_tokenizer`). Weights are random and perturbed away from the usual init (norm
weights != 1, biases != 0), so a parity test on them can fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mmkit.models.common.hf_io import save_state_dict
from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from mmkit.models.qwen2_5_vl.hf import to_hf
from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer
from mmkit.outputs import claim_output_dir


def tiny_config(token_ids: dict[str, int] | None = None, **text_overrides) -> Qwen2_5_VLConfig:
    """A test-sized config: vision depth 2 (block 1 full attention), width 32; LLM 2 layers, width 64, GQA 4/2.

    `token_ids` is the dict `build_tiny_tokenizer` returns (vocab size and special ids).
    Example: `cfg = tiny_config(build_tiny_tokenizer("/tmp/t"))`.
    """
    # Defaults: the ids `build_tiny_tokenizer()` assigns (384 BPE tokens, then the 22 added tokens).
    default_ids = dict(vocab_size=406, bos_token_id=384, eos_token_id=386, pad_token_id=384)
    default_ids.update(
        vision_start_token_id=393, vision_end_token_id=394, image_token_id=396, video_token_id=397
    )
    ids = dict(token_ids or default_ids)
    text = dict(
        vocab_size=ids.pop("vocab_size"),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),  # head_dim 16 -> 8 rotary pairs
        max_position_embeddings=4096,
    )
    text.update(text_overrides)
    vision = VisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        fullatt_block_indexes=(1,),
        out_hidden_size=text["hidden_size"],
        tokens_per_second=2,
    )
    ids.pop("vision_token_id", None)
    return Qwen2_5_VLConfig(vision=vision, text=TextConfig(**text), **ids)


@torch.no_grad()
def perturbed_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter: matrices ~ N(0, 1/fan_in), vectors (norms, biases) away from 1 / 0.

    Example: `perturbed_init(Qwen2_5_VLModel(cfg), seed=0)`.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight") or "norm" in name.split(".")[-2]:
            p.copy_(1.0 + 0.2 * noise)
        elif p.ndim == 1:
            p.copy_(0.1 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / math.sqrt(p.shape[-1]))


def create_tiny_qwen2_5_vl(
    outdir: str | Path, seed: int = 0, cfg: Qwen2_5_VLConfig | None = None, overwrite: bool = False
) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint folder that transformers and mmkit both load.

    `cfg` replaces the tiny config (its token ids are overwritten with the tiny tokenizer's, so it must
    not change the vocabulary). Returns the folder. A folder an earlier `create-tiny` wrote is replaced only
    with `overwrite=True`; any other non-empty folder is refused (`mmkit.outputs.claim_output_dir`).
    Example:
        >>> path = create_tiny_qwen2_5_vl("/tmp/tiny_qwen", seed=0)
        >>> model, processor = mmkit.load_vlm(path)
    """
    outdir = claim_output_dir(outdir, "create-tiny qwen2_5_vl", overwrite)
    ids = build_tiny_tokenizer(outdir, patch_size=cfg.vision.patch_size if cfg is not None else 14)
    if cfg is None:
        cfg = tiny_config(ids)
    else:
        for k, v in ids.items():
            if k == "vocab_size":
                cfg.text.vocab_size = v
            elif hasattr(cfg, k):
                setattr(cfg, k, v)
        cfg.validate()
    torch.manual_seed(seed)
    model = Qwen2_5_VLModel(cfg)
    perturbed_init(model, seed)
    sd = to_hf(model.state_dict(), cfg)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    save_state_dict(sd, outdir, "model", max_shard_bytes=max(total // 3, 1))  # force several shards
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["dtype"] = "float32"
    (outdir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_ids,
    }
    (outdir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return outdir
