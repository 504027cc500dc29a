"""OpenSoraPlan 1.3 DiT configuration and the named flavors.

Field names follow the diffusers-style `config.json` the release writes next to
`diffusion_pytorch_model.safetensors` (classes `OpenSoraT2V_v1_3` and `OpenSoraInpaint_v1_3`), so a
release folder's `config.json` maps onto `OSPConfig` one to one.

Flavors cite the public configs (LanguageBind/Open-Sora-Plan-v1.3.0, `any93x640x640/config.json` and
`any93x640x640_i2v/config.json`, the `OpenSoraT2V_v1_3-2B/122` model of Open-Sora-Plan v1.3.1):
32 layers, 24 heads x 96 = 2304, caption 4096 (mT5-XXL), patch 1x2x2, 8 latent channels,
gelu-approximate MLP of 4x width, LayerNorm without affine (eps 1e-6), Skiparse with k = 4.
The i2v flavor adds the inpainting branches (masked-video latents and a 4-channel compressed mask).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

T2V_CLASS = "OpenSoraT2V_v1_3"
I2V_CLASS = "OpenSoraInpaint_v1_3"
# Layers that stay dense whatever `sparse1d` says: the original hard-codes 0, 1, 30 and 31
# (`sparse1d if 1 < i < 30`), for any depth.
DENSE_HEAD, DENSE_TAIL = 2, 30


@dataclass
class OSPConfig:
    """Hyper-parameters of one OpenSoraPlan 1.3 DiT. `hidden = num_attention_heads * attention_head_dim`."""

    num_attention_heads: int = 24
    attention_head_dim: int = 96
    in_channels: int = 8
    out_channels: int = 8
    num_layers: int = 32
    caption_channels: int = 4096
    cross_attention_dim: int = 2304
    patch_size: int = 2
    patch_size_t: int = 1
    activation_fn: str = "gelu-approximate"
    attention_bias: bool = True
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    sample_size_h: int | None = None  # training resolution in latents; only recorded
    sample_size_w: int | None = None
    sample_size_t: int | None = None
    interpolation_scale_t: float = 1.0
    interpolation_scale_h: float = 1.0
    interpolation_scale_w: float = 1.0
    sparse1d: bool = True  # Skiparse on layers 2..29
    sparse_n: int = 4  # Skiparse k: tokens are padded to a multiple of k^2 and regrouped into k groups
    vae_scale_factor_t: int | None = None  # i2v only: mask channels (the VAE's temporal stride)
    text_len: int = 512  # mT5 context length of the release (tokenizer max_length)
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, kept verbatim

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def i2v(self) -> bool:
        return self.vae_scale_factor_t is not None

    def skiparse(self, i: int) -> str | None:
        """The attention of layer `i`: None (dense), "single" (even layers) or "group" (odd layers)."""
        if not self.sparse1d or not DENSE_HEAD <= i < DENSE_TAIL:
            return None
        return "group" if i % 2 == 1 else "single"

    def validate(self) -> OSPConfig:
        """Raise a clear ValueError for values the model cannot take; returns self."""
        where = "OpenSoraPlan transformer config"
        if self.attention_head_dim % 6:
            raise ValueError(
                f"{where}: attention_head_dim={self.attention_head_dim} must be a multiple of 6 "
                "(RoPE-3D rotates three equal halves-pairs for t, h, w), e.g. 96"
            )
        if self.patch_size_t != 1:
            raise ValueError(f"{where}: patch_size_t={self.patch_size_t} unsupported; v1.3 uses 1")
        if self.activation_fn != "gelu-approximate":
            raise ValueError(
                f"{where}: activation_fn={self.activation_fn!r} unsupported; v1.3 uses 'gelu-approximate'"
            )
        if self.norm_elementwise_affine:
            raise ValueError(f"{where}: norm_elementwise_affine=true unsupported; v1.3 uses false")
        if not self.attention_bias:
            raise ValueError(f"{where}: attention_bias=false unsupported; v1.3 uses true")
        if self.cross_attention_dim != self.hidden:
            raise ValueError(
                f"{where}: cross_attention_dim={self.cross_attention_dim} must equal the hidden size "
                f"{self.hidden} (the caption projection maps captions to it)"
            )
        if self.sparse1d and self.sparse_n < 2:
            raise ValueError(f"{where}: sparse_n={self.sparse_n} must be >= 2 when sparse1d is true")
        if self.vae_scale_factor_t is not None and self.vae_scale_factor_t < 1:
            raise ValueError(
                f"{where}: vae_scale_factor_t={self.vae_scale_factor_t} must be >= 1 (4 in v1.3)"
            )
        return self

    @classmethod
    def from_dict(cls, d: dict) -> OSPConfig:
        """Build from a release `config.json` dict; `_class_name` OpenSoraInpaint_v1_3 makes it i2v.

        Example: `OSPConfig.from_dict(json.load(open("any93x640x640/config.json")))`.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for k, want in (("dropout", 0.0), ("only_cross_attention", False), ("double_self_attention", False)):
            if d.get(k, want) != want:
                raise ValueError(
                    f"OpenSoraPlan transformer config: {k}={d[k]!r} unsupported; v1.3 uses {want!r}"
                )
        kw = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        # the inpainting class always records vae_scale_factor_t; the t2v class has no such field
        if d.get("_class_name") == T2V_CLASS:
            kw.pop("vae_scale_factor_t", None)
        elif d.get("_class_name") == I2V_CLASS:
            kw.setdefault("vae_scale_factor_t", 4)
        if kw.get("out_channels") is None:
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        return cls(**kw, extra=extra).validate()

    def to_dict(self) -> dict:
        """The release config.json dict (with `_class_name`)."""
        d = {"_class_name": I2V_CLASS if self.i2v else T2V_CLASS}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "text_len") or (f.name == "vae_scale_factor_t" and not self.i2v):
                continue
            d[f.name] = getattr(self, f.name)
        d.update(self.extra)
        return dict(sorted(d.items(), key=lambda kv: (kv[0] != "_class_name", kv[0])))


# `OpenSoraT2V_v1_3_2B_122` / `OpenSoraInpaint_v1_3_2B_122` of Open-Sora-Plan v1.3.1 (the defaults above)
FLAVORS: dict[str, OSPConfig] = {
    "v1.3-2B": OSPConfig(),
    "v1.3-2B-i2v": OSPConfig(vae_scale_factor_t=4),
}

# the test models: the shape of the parity fixtures' t2v / i2v configs (2 heads x 24, 4 layers, caption 32;
# layers 2, 3 are Skiparse single / group)
_TINY = dict(
    num_attention_heads=2, attention_head_dim=24, num_layers=4, caption_channels=32, cross_attention_dim=48
)
TINY: dict[str, OSPConfig] = {
    "tiny": OSPConfig(**_TINY, text_len=8),
    "tiny-i2v": OSPConfig(**_TINY, text_len=8, vae_scale_factor_t=4),
}
