"""Wan2.1 DiT configuration and the named flavors.

Field names follow the diffusers `WanTransformer3DModel` config.json, so a folder's
`transformer/config.json` maps onto `WanConfig` one to one.

Flavors cite the public configs:
- Wan-AI/Wan2.1-T2V-1.3B(-Diffusers): dim 1536, ffn 8960, 12 heads, 30 layers.
- Wan-AI/Wan2.1-T2V-14B(-Diffusers): dim 5120, ffn 13824, 40 heads, 40 layers.
- Wan-AI/Wan2.1-I2V-14B-480P / -720P(-Diffusers): the 14B DiT with in_channels 36
  (16 noise + 4 mask + 16 image latents), CLIP ViT-H image context (image_dim 1280) and
  added key/value projections for the image tokens in cross-attention.
Shared: patch (1, 2, 2), text_dim 4096 (umT5-XXL), freq_dim 256, qk RMSNorm across heads,
cross-attention norm, eps 1e-6, 3-D RoPE over frame/height/width (theta 10000).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class WanConfig:
    """Hyper-parameters of one Wan2.1 DiT. `dim = num_attention_heads * attention_head_dim`."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None  # CLIP hidden size for i2v (1280), None for t2v
    added_kv_proj_dim: int | None = None  # == dim for i2v: image K/V projections in cross-attention
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None  # FLF2V only (learned position of two images' tokens)
    text_len: int = 512  # the umT5 context length the model was trained with (pad target)
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept verbatim

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self) -> WanConfig:
        """Raise a clear ValueError for impossible values; returns self."""
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise ValueError(
                f"transformer config: patch_size={self.patch_size} must be 3 positive ints, e.g. [1, 2, 2]"
            )
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise ValueError(
                f"transformer config: attention_head_dim={self.attention_head_dim} must be even and >= 6 "
                "(3-D RoPE splits it over frame/height/width)"
            )
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                "transformer config: image_dim and added_kv_proj_dim must both be set (i2v) or both be null (t2v); "
                f"got image_dim={self.image_dim}, added_kv_proj_dim={self.added_kv_proj_dim}"
            )
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            raise ValueError(
                f"transformer config: qk_norm={self.qk_norm!r} unsupported; use 'rms_norm_across_heads'"
            )
        return self

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        """Build from a diffusers `transformer/config.json` dict (keys starting with `_` are ignored).

        Example: `WanConfig.from_dict(json.load(open("transformer/config.json")))`.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(kw["patch_size"])
        if kw.get("out_channels") is None:
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        return cls(**kw, extra=extra).validate()

    def to_dict(self) -> dict:
        """The diffusers config.json dict (with `_class_name`)."""
        d = {"_class_name": "WanTransformer3DModel"}
        for f in dataclasses.fields(self):
            if f.name == "extra" or (f.name == "text_len" and self.text_len == f.default):
                continue  # text_len: only a non-default context length is written (diffusers ignores it)
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        d.update(self.extra)
        return d


_I2V = dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
FLAVORS: dict[str, WanConfig] = {
    "1.3B": WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14B": WanConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "i2v-14B-480P": WanConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40, **_I2V),
    "i2v-14B-720P": WanConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40, **_I2V),
}
