"""transformers <-> mmkit state dicts for Qwen2.5-VL: pure name maps (plus one reshape).

`from_hf` accepts both layouts found in the wild: transformers >= 4.52 / 5.x
(`model.visual.*`, `model.language_model.*`, `lm_head.*`) and the original Qwen release on the Hub
(`visual.*`, `model.layers.*`, `model.embed_tokens.*`). `to_hf` writes the 5.x layout, or the
original one with `legacy=True`. The model never imports this file.
"""

from __future__ import annotations

import re

import torch

from mmkit.models.common.hf_io import check_keys
from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig

# (transformers name, mmkit name); "{}" is the block/layer index.
_VISION = [
    (
        "patch_embed.proj.weight",
        "patch_embed.weight",
    ),  # Conv3d kernel (D, C, T, P, P) <-> Linear (D, C*T*P*P)
    ("blocks.{}.norm1.weight", "blocks.{}.norm1.weight"),
    ("blocks.{}.norm2.weight", "blocks.{}.norm2.weight"),
    ("blocks.{}.attn.qkv.weight", "blocks.{}.attn.qkv.weight"),
    ("blocks.{}.attn.qkv.bias", "blocks.{}.attn.qkv.bias"),
    ("blocks.{}.attn.proj.weight", "blocks.{}.attn.proj.weight"),
    ("blocks.{}.attn.proj.bias", "blocks.{}.attn.proj.bias"),
    *[
        (f"blocks.{{}}.mlp.{p}.{t}", f"blocks.{{}}.mlp.{p}.{t}")
        for p in ("gate_proj", "up_proj", "down_proj")
        for t in ("weight", "bias")
    ],
    ("merger.ln_q.weight", "merger.norm.weight"),
    ("merger.mlp.0.weight", "merger.fc1.weight"),
    ("merger.mlp.0.bias", "merger.fc1.bias"),
    ("merger.mlp.2.weight", "merger.fc2.weight"),
    ("merger.mlp.2.bias", "merger.fc2.bias"),
]
_TEXT = [
    ("embed_tokens.weight", "embed_tokens.weight"),
    ("norm.weight", "norm.weight"),
    ("layers.{}.input_layernorm.weight", "layers.{}.attn_norm.weight"),
    ("layers.{}.post_attention_layernorm.weight", "layers.{}.mlp_norm.weight"),
    *[
        (f"layers.{{}}.self_attn.{p}.{t}", f"layers.{{}}.attn.{p}.{t}")
        for p in ("q_proj", "k_proj", "v_proj")
        for t in ("weight", "bias")
    ],
    ("layers.{}.self_attn.o_proj.weight", "layers.{}.attn.o_proj.weight"),
    *[
        (f"layers.{{}}.mlp.{p}.weight", f"layers.{{}}.mlp.{p}.weight")
        for p in ("gate_proj", "up_proj", "down_proj")
    ],
]


def _name_map(legacy: bool = False) -> list[tuple[str, str]]:
    vis, txt = ("visual.", "model.") if legacy else ("model.visual.", "model.language_model.")
    pairs = [(vis + h, "visual." + m) for h, m in _VISION]
    pairs += [(txt + h, "language." + m) for h, m in _TEXT]
    pairs.append(("lm_head.weight", "language.lm_head.weight"))
    return pairs


def _compile(pairs: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern, str]]:
    out = []
    for hf, mm in pairs:
        src, dst = (mm, hf) if reverse else (hf, mm)
        pattern = re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$")
        out.append((pattern, dst))
    return out


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, dst in rules:
        m = pattern.match(name)
        if m:
            return dst.replace("{}", m.group(1)) if m.groups() else dst
    return None


def _is_legacy(sd: dict) -> bool:
    return any(k.startswith("visual.") or k.startswith("model.layers.") for k in sd)


def expected_hf_keys(cfg: Qwen2_5_VLConfig, legacy: bool = False) -> list[str]:
    """Every tensor name a transformers checkpoint of this config holds (lm_head absent when tied)."""
    keys = []
    for hf, _ in _name_map(legacy):
        if "{}" not in hf:
            keys.append(hf)
            continue
        n = cfg.vision.depth if "blocks.{}" in hf else cfg.text.num_hidden_layers
        keys += [hf.replace("{}", str(i)) for i in range(n)]
    if cfg.tie_word_embeddings:
        keys.remove("lm_head.weight")
    return keys


def from_hf(sd: dict[str, torch.Tensor], cfg: Qwen2_5_VLConfig) -> dict[str, torch.Tensor]:
    """transformers state dict -> mmkit `Qwen2_5_VLModel` state dict.

    Raises one clear error listing missing/unexpected keys. A tied `lm_head.weight` present in the
    file is dropped (mmkit ties it to the embedding). Example: `model.load_state_dict(from_hf(sd, cfg))`.
    """
    legacy = _is_legacy(sd)
    sd = dict(sd)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    check_keys(expected_hf_keys(cfg, legacy), sd.keys(), "Qwen2.5-VL checkpoint (transformers layout)")
    rules = _compile(_name_map(legacy), reverse=False)
    out = {}
    for name, t in sd.items():
        new = _rename(name, rules)
        assert new is not None, name  # check_keys covered every name
        if new == "visual.patch_embed.weight":
            t = t.reshape(t.shape[0], -1)
        out[new] = t
    if cfg.tie_word_embeddings:
        out["language.lm_head.weight"] = out["language.embed_tokens.weight"]
    return out


def to_hf(
    sd: dict[str, torch.Tensor], cfg: Qwen2_5_VLConfig, legacy: bool = False
) -> dict[str, torch.Tensor]:
    """mmkit state dict -> transformers state dict (5.x names, or the original Qwen names if `legacy`).

    Example: `save_state_dict(to_hf(model.state_dict(), cfg), "out", "model")`.
    """
    v = cfg.vision
    rules = _compile(_name_map(legacy), reverse=True)
    out, unknown = {}, []
    for name, t in sd.items():
        if cfg.tie_word_embeddings and name == "language.lm_head.weight":
            continue
        new = _rename(name, rules)
        if new is None:
            unknown.append(name)
            continue
        if name == "visual.patch_embed.weight":
            t = t.reshape(t.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        out[new] = t
    if unknown:
        raise ValueError(
            f"to_hf: {len(unknown)} mmkit tensor(s) have no transformers name: {', '.join(unknown[:20])}"
        )
    check_keys(expected_hf_keys(cfg, legacy), out.keys(), "to_hf output")
    return out
