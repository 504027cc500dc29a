"""Shared helpers for Wan tests: a tiny, perturbed diffusers reference DiT."""

from __future__ import annotations

import torch


def tiny_dit_kwargs(i2v: bool = False, layers: int = 2) -> dict:
    # head_dim 24 -> RoPE split 8/8/8: all three axes are exercised
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=36 if i2v else 16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=40 if i2v else None,
        added_kv_proj_dim=48 if i2v else None,
        rope_max_seq_len=64,
    )


def perturbed_reference(i2v: bool = False, seed: int = 0, layers: int = 2):
    """diffusers WanTransformer3DModel with every parameter moved away from its init."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**tiny_dit_kwargs(i2v, layers)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref
