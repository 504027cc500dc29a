"""OpenSoraPlan 1.3 WF-VAE (wavelet-flow VAE): 4x8x8 compression, causal in time, with chunked inference.

The video is first split by a 3D Haar transform (8 subbands x 3 RGB = 24 channels at half size in t, h,
w; the first frame alone, so a clip of 1 + 4k frames gives 1 + 2k wavelet frames). The encoder mixes two
"energy flow" side paths built from further Haar transforms of the low band into its main convolution
path; the decoder mirrors it and ends with the inverse 3D transform. Latents: 8 channels, time
1 + (T - 1) / 4, space / 8.

Everything temporal is causal: a 3D convolution sees the current and previous frames only (the first
frame is repeated as left padding). That makes chunked inference exact: `encode(x, tiled=True)` runs the
encoder on 1 + 16k wavelet frames at a time and `decode(z, tiled=True)` on 4 latent frames at a time
(plus one look-ahead frame whose outputs are dropped), each causal module carrying the frames it needs
from the previous chunk. Tiled equals untiled to float noise (~2e-6).

Parameter names are those of the release checkpoint (`WFVAEModel` of Open-Sora-Plan v1.3.1, including
its spelling `wavelet_tranform_*`), so a release state dict loads strictly. Config field names are the
release `config.json`'s.

Example:
    >>> vae = WFVAE(WFVAEConfig(base_channels=8, encoder_energy_flow_hidden_size=4,
    ...                         decoder_energy_flow_hidden_size=8, norm_type="layernorm"))
    >>> post = vae.encode(video)             # video (B, 3, 1 + 4k, 8h, 8w) in [-1, 1]
    >>> z = vae.scale_latents(post.sample())  # what the DiT sees
    >>> video = vae.decode(vae.unscale_latents(z), tiled=True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# the release's Haar filters use this rounded 1/sqrt(8); kept so outputs match the release bit for bit
HAAR3D = 0.3536
# subband order of the 3D transform (low/high along w, h, t); also the release's parameter names
_SUBBANDS = ("h", "g", "hh", "gh", "h_v", "g_v", "hh_v", "gh_v")
_SIGNS_W = {"h": 1, "g": -1, "hh": 1, "gh": -1}  # second tap along w
_SIGNS_H = {"h": 1, "g": 1, "hh": -1, "gh": -1}  # second tap along h
_SUPPORTED = {
    "l1_dowmsample_block": "Downsample",
    "l1_downsample_wavelet": "HaarWaveletTransform2D",
    "l2_dowmsample_block": "Spatial2xTime2x3DDownsample",
    "l2_downsample_wavelet": "HaarWaveletTransform3D",
    "l1_upsample_block": "Upsample",
    "l1_upsample_wavelet": "InverseHaarWaveletTransform2D",
    "l2_upsample_block": "Spatial2xTime2x3DUpsample",
    "l2_upsample_wavelet": "InverseHaarWaveletTransform3D",
}


@dataclass
class WFVAEConfig:
    """The release `vae/config.json` fields (`WFVAEModel`); defaults are the class defaults of v1.3.1.

    The released OpenSoraPlan 1.3 VAE (`WFVAEModel_D8_4x8x8`, LanguageBind/Open-Sora-Plan-v1.3.0 `vae/`)
    sets base_channels=128, encoder/decoder energy flow 64/128, norm_type "layernorm",
    t_interpolation "trilinear", connect_res_layer_num 2.
    """

    latent_dim: int = 8
    base_channels: int = 128
    encoder_num_resblocks: int = 2
    encoder_energy_flow_hidden_size: int = 64
    decoder_num_resblocks: int = 2
    decoder_energy_flow_hidden_size: int = 128
    use_attention: bool = True
    dropout: float = 0.0
    norm_type: str = "groupnorm"  # "groupnorm" (32 groups) | "layernorm" (over channels)
    t_interpolation: str = "nearest"  # temporal upsampling mode: "nearest" | "trilinear"
    connect_res_layer_num: int = 1
    scale: list[float] = field(default_factory=lambda: [0.18215] * 8)  # DiT latent = (z - shift) * scale
    shift: list[float] = field(default_factory=lambda: [0.0] * 8)
    l1_dowmsample_block: str = "Downsample"
    l1_downsample_wavelet: str = "HaarWaveletTransform2D"
    l2_dowmsample_block: str = "Spatial2xTime2x3DDownsample"
    l2_downsample_wavelet: str = "HaarWaveletTransform3D"
    l1_upsample_block: str = "Upsample"
    l1_upsample_wavelet: str = "InverseHaarWaveletTransform2D"
    l2_upsample_block: str = "Spatial2xTime2x3DUpsample"
    l2_upsample_wavelet: str = "InverseHaarWaveletTransform3D"

    @classmethod
    def from_dict(cls, d: dict, where: str = "WF-VAE config.json") -> WFVAEConfig:
        """Config from a release / diffusers `config.json` dict (`_class_name` and other `_` keys ignored).

        Example: `WFVAEConfig.from_dict(json.load(open("vae/config.json")))`.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {', '.join(unknown)}; a WFVAEModel config has {sorted(known)}"
            )
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, where: str = "WF-VAE config") -> None:
        for name, want in _SUPPORTED.items():
            if getattr(self, name) != want:
                raise ValueError(
                    f"{where}: {name}={getattr(self, name)!r} is not supported; mmkit implements the "
                    f"OpenSoraPlan 1.3 WF-VAE ({name}={want!r})"
                )
        if self.norm_type not in ("groupnorm", "layernorm"):
            raise ValueError(f"{where}: norm_type={self.norm_type!r}: choose 'groupnorm' or 'layernorm'")
        if self.t_interpolation not in ("nearest", "trilinear"):
            raise ValueError(
                f"{where}: t_interpolation={self.t_interpolation!r}: choose 'nearest' or 'trilinear'"
            )
        if self.decoder_energy_flow_hidden_size != self.base_channels:
            raise ValueError(
                f"{where}: decoder_energy_flow_hidden_size={self.decoder_energy_flow_hidden_size} must equal "
                f"base_channels={self.base_channels} (the decoder's side paths run at base width)"
            )
        if len(self.scale) != self.latent_dim or len(self.shift) != self.latent_dim:
            raise ValueError(
                f"{where}: scale ({len(self.scale)}) and shift ({len(self.shift)}) need latent_dim="
                f"{self.latent_dim} entries"
            )


# ---------------------------------------------------------------------------------------------------
# Haar transforms
# ---------------------------------------------------------------------------------------------------
def haar3d_filters(dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
    """The 8 release 3D Haar filters, each (1, 1, 2, 2, 2) over (t, h, w), keyed by subband name."""
    out = {}
    for name in _SUBBANDS:
        base = name.removesuffix("_v")
        w = torch.tensor([1.0, _SIGNS_W[base]])
        h = torch.tensor([1.0, _SIGNS_H[base]])
        t = torch.tensor([1.0, -1.0 if name.endswith("_v") else 1.0])
        f = t.view(2, 1, 1) * h.view(1, 2, 1) * w.view(1, 1, 2) * HAAR3D
        out[name] = f.view(1, 1, 2, 2, 2).to(device=device, dtype=dtype)
    return out


def _haar2d_filters() -> dict[str, torch.Tensor]:
    rows = {"aa": (1, 1, 1, 1), "ad": (1, 1, -1, -1), "da": (1, -1, 1, -1), "dd": (1, -1, -1, 1)}
    return {k: torch.tensor(v, dtype=torch.float32).view(1, 1, 2, 2) / 2 for k, v in rows.items()}


def _stack(filters) -> torch.Tensor:
    return torch.cat(list(filters), dim=0)  # (S, 1, k...) one output channel per subband


def haar3d(x: torch.Tensor, weight: torch.Tensor, pad_first: bool = True) -> torch.Tensor:
    """Causal 3D Haar transform: (B, C, T, H, W) -> (B, 8C, T', H/2, W/2), subband-major channels.

    `weight` (8, 1, 2, 2, 2) stacks the filters in `_SUBBANDS` order; with `pad_first` the first frame is
    repeated once on the left (T' = (T + 1) / 2), else T' = T / 2 (a later chunk of a stream).
    """
    b, c = x.shape[:2]
    x = x.reshape(b * c, 1, *x.shape[2:])
    if pad_first:
        x = torch.cat([x[:, :, :1], x], dim=2)
    y = F.conv3d(x, weight.to(x.dtype), stride=2)  # (B*C, 8, T', H/2, W/2)
    return y.view(b, c, 8, *y.shape[2:]).transpose(1, 2).reshape(b, 8 * c, *y.shape[2:])


def inverse_haar3d(coeffs: torch.Tensor, weight: torch.Tensor, drop_first: bool = True) -> torch.Tensor:
    """Inverse of `haar3d`: (B, 8C, T, H, W) -> (B, C, 2T - 1, 2H, 2W) (2T frames without `drop_first`)."""
    b, c8 = coeffs.shape[:2]
    c = c8 // 8
    x = coeffs.view(b, 8, c, *coeffs.shape[2:]).transpose(1, 2).reshape(b * c, 8, *coeffs.shape[2:])
    y = F.conv_transpose3d(x, weight.to(x.dtype), stride=2)  # (B*C, 1, 2T, 2H, 2W): sums the subbands
    if drop_first:
        y = y[:, :, 1:]
    return y.view(b, c, *y.shape[2:])


def _frames(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame of (B, C, T, H, W)."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, H, W)
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


class HaarWavelet2D(nn.Module):
    """Per-frame 2D Haar transform: (B, C, T, H, W) -> (B, 4C, T, H/2, W/2), subband-major."""

    def __init__(self):
        super().__init__()
        for k, v in _haar2d_filters().items():
            self.register_buffer(k, v)

    def forward(self, x):
        w = _stack([self.aa, self.ad, self.da, self.dd])

        def one(f):  # (N, C, H, W)
            n, c = f.shape[:2]
            y = F.conv2d(f.reshape(n * c, 1, *f.shape[2:]), w.to(f.dtype), stride=2)  # (N*C, 4, h, w)
            return y.view(n, c, 4, *y.shape[2:]).transpose(1, 2).reshape(n, 4 * c, *y.shape[2:])

        return _frames(one, x)


class InverseHaarWavelet2D(HaarWavelet2D):
    """Inverse of `HaarWavelet2D`: (B, 4C, T, H, W) -> (B, C, T, 2H, 2W)."""

    def forward(self, x):
        w = _stack([self.aa, self.ad, self.da, self.dd])

        def one(f):
            n, c4 = f.shape[:2]
            c = c4 // 4
            y = f.view(n, 4, c, *f.shape[2:]).transpose(1, 2).reshape(n * c, 4, *f.shape[2:])
            return F.conv_transpose2d(y, w.to(f.dtype), stride=2).view(n, c, 2 * f.shape[2], 2 * f.shape[3])

        return _frames(one, x)


# ---------------------------------------------------------------------------------------------------
# Causal building blocks. Streaming state: `stream` is on during chunked inference; `cache` holds the
# frames the next chunk needs; `cache_offset` frames at the end of a chunk are look-ahead, not cached.
# ---------------------------------------------------------------------------------------------------
class CausalConv3d(nn.Module):
    """3D convolution, causal in time: the first frame (or the previous chunk's last frames) pads the left."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True
    ):
        super().__init__()
        self.kt = kernel
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, padding, padding), bias=bias)
        self.stream, self.cache, self.cache_offset = False, None, 0

    def forward(self, x):  # (B, C, T, H, W)
        if self.kt > 1:
            pad = self.cache if self.cache is not None else x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1)
            x = torch.cat([pad, x], dim=2)
            if self.stream:
                keep = (self.kt - 1) // self.conv.stride[0]  # frames the next chunk's window reaches back
                usable = x[:, :, : x.shape[2] - self.cache_offset]
                self.cache = usable[:, :, usable.shape[2] - keep :] if keep else x[:, :, :0]
        return self.conv(x)


class Conv2dFrames(nn.Conv2d):
    """A 2D convolution applied to every frame of (B, C, T, H, W)."""

    def forward(self, x):
        return _frames(super().forward, x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of (B, C, ...)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x):
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def _norm(channels: int, kind: str) -> nn.Module:
    if kind == "layernorm":
        return ChannelLayerNorm(channels)
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock2D(nn.Module):
    """Per-frame residual block: norm, SiLU, conv3x3, norm, SiLU, conv3x3, 1x1 shortcut if widths differ."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, norm), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, norm), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def _f(self, x):  # (N, C, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h

    def forward(self, x):
        return _frames(self._f, x)


class ResBlock3D(nn.Module):
    """Causal residual block: norm, SiLU, causal conv3x3x3, norm, SiLU, causal conv3x3x3 (+ 1x1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, norm), CausalConv3d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, norm), CausalConv3d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        if cin != cout:
            self.nin_shortcut = CausalConv3d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Attention3D(nn.Module):
    """Single-head self-attention within each frame over its H*W positions (the release AttnBlock3DFix)."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.norm = _norm(channels, norm)
        self.q, self.k, self.v = (CausalConv3d(channels, channels, 1) for _ in range(3))
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x):
        h = self.norm(x)
        b, c, t, hh, ww = x.shape

        def tokens(y):  # (B, C, T, H, W) -> (B*T, 1, H*W, C)
            return y.permute(0, 2, 3, 4, 1).reshape(b * t, 1, hh * ww, c)

        o = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        o = o.view(b, t, hh, ww, c).permute(0, 4, 1, 2, 3)
        return x + self.proj_out(o)


class Downsample2D(nn.Module):
    """Per-frame 2x spatial downsampling: pad right/bottom by 1, conv3x3 stride 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2)

    def forward(self, x):
        return _frames(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x)


class Downsample3D(nn.Module):
    """2x in time (causal) and space: pad right/bottom by 1, causal conv3x3x3 stride 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1, 0, 0)))


class Upsample2D(nn.Module):
    """Per-frame 2x spatial upsampling: nearest, then conv3x3."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return _frames(lambda f: self.conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)


class Upsample3D(nn.Module):
    """2x in time and space, causal: frame 0 stays one frame, every later frame becomes two.

    Time uses `t_interpolation`, space trilinear (bilinear per frame), then a causal conv3x3x3. Streaming,
    the previous chunk's last real frame is prepended and its two outputs dropped, so the interpolation
    at a chunk start sees the same neighbour as in one pass.
    """

    def __init__(self, cin: int, cout: int, t_interpolation: str):
        super().__init__()
        self.mode = t_interpolation
        self.conv = CausalConv3d(cin, cout, 3, padding=1)
        self.stream, self.cache = False, None

    def _space(self, x):
        return F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear")

    def forward(self, x):
        if self.stream and self.cache is not None:
            x = torch.cat([self.cache, x], dim=2)
            self.cache = x[:, :, -2:-1]  # the last real frame; the chunk's last frame is look-ahead
            x = F.interpolate(x, scale_factor=(2, 1, 1), mode=self.mode)[:, :, 2:]
            x = self._space(x)
        else:
            if self.stream:
                self.cache = x[:, :, -1:]
            if x.shape[2] > 1:
                rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 1, 1), mode=self.mode)
                x = torch.cat([self._space(x[:, :, :1]), self._space(rest)], dim=2)
            else:
                x = self._space(x)
        return self.conv(x)


class InverseHaarWavelet3D(nn.Module):
    """Inverse 3D Haar with the release buffers; drops the causal pad frame (the first chunk only, streaming)."""

    def __init__(self):
        super().__init__()
        for k, v in haar3d_filters().items():
            self.register_buffer(k, v)
        self.stream, self.cache = False, None

    def forward(self, coeffs):
        first = not (self.stream and self.cache)
        self.cache = True
        return inverse_haar3d(coeffs, _stack(getattr(self, n) for n in _SUBBANDS), drop_first=first)


class HaarWavelet3D(nn.Module):
    """3D Haar transform whose filters are (frozen) parameters of the checkpoint (`<subband>_conv.conv.weight`)."""

    def __init__(self):
        super().__init__()
        for name, f in haar3d_filters().items():
            conv = CausalConv3d(1, 1, 2, stride=2, bias=False)
            conv.conv.weight.data.copy_(f)
            conv.requires_grad_(False)
            self.add_module(f"{name}_conv", conv)
        self.stream, self.cache = False, None

    def forward(self, x):
        first = not (self.stream and self.cache)  # a later chunk: no causal pad (the stride-2 pairs continue)
        self.cache = True
        w = _stack(getattr(self, f"{n}_conv").conv.weight for n in _SUBBANDS)
        return haar3d(x, w, pad_first=first)


# ---------------------------------------------------------------------------------------------------
# Encoder / decoder
# ---------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Wavelet coefficients (B, 24, T', H/2, W/2) -> moments (B, 2 * latent_dim, T_lat, H/8, W/8)."""

    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        c, e, n, nt, dp = (
            cfg.base_channels,
            cfg.encoder_energy_flow_hidden_size,
            cfg.encoder_num_resblocks,
            cfg.norm_type,
            cfg.dropout,
        )
        self.down1 = nn.Sequential(
            Conv2dFrames(24, c, 3, padding=1),
            *[ResBlock2D(c, c, nt, dp) for _ in range(n)],
            Downsample2D(c, c),
        )
        self.down2 = nn.Sequential(
            Conv2dFrames(c + e, 2 * c, 3, padding=1),
            *[ResBlock3D(2 * c, 2 * c, nt, dp) for _ in range(n)],
            Downsample3D(2 * c, 2 * c),
        )
        self.connect_l1 = Conv2dFrames(12, e, 3, padding=1)
        self.connect_l2 = Conv2dFrames(24, e, 3, padding=1)
        mid = [ResBlock3D(2 * c + e, 4 * c, nt, dp), ResBlock3D(4 * c, 4 * c, nt, dp)]
        if cfg.use_attention:
            mid.insert(1, Attention3D(4 * c, nt))
        self.mid = nn.Sequential(*mid)
        self.norm_out = _norm(4 * c, nt)
        self.conv_out = CausalConv3d(4 * c, 2 * cfg.latent_dim, 3, padding=1)
        self.wavelet_tranform_l1 = HaarWavelet2D()
        self.wavelet_tranform_l2 = HaarWavelet3D()

    def forward(self, coeffs):
        l1_coeffs = self.wavelet_tranform_l1(coeffs[:, :3])  # (B, 12, T', H/4, W/4): 2D Haar of the low band
        l1 = self.connect_l1(l1_coeffs)
        l2 = self.connect_l2(self.wavelet_tranform_l2(l1_coeffs[:, :3]))  # (B, E, T_lat, H/8, W/8)
        h = torch.cat([self.down1(coeffs), l1], dim=1)
        h = torch.cat([self.down2(h), l2], dim=1)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, latent_dim, T_lat, h, w) -> wavelet coefficients (B, 24, 1 + 2(T_lat - 1), 4h, 4w)."""

    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        c, e, n, nt, dp = (
            cfg.base_channels,
            cfg.decoder_energy_flow_hidden_size,
            cfg.decoder_num_resblocks,
            cfg.norm_type,
            cfg.dropout,
        )
        self.e = e
        self.conv_in = CausalConv3d(cfg.latent_dim, 4 * c, 3, padding=1)
        mid = [ResBlock3D(4 * c, 4 * c, nt, dp), ResBlock3D(4 * c, 4 * c + e, nt, dp)]
        if cfg.use_attention:
            mid.insert(1, Attention3D(4 * c, nt))
        self.mid = nn.Sequential(*mid)
        self.up2 = nn.Sequential(
            *[ResBlock3D(4 * c, 4 * c, nt, dp) for _ in range(n)],
            Upsample3D(4 * c, 4 * c, cfg.t_interpolation),
            ResBlock3D(4 * c, 4 * c + e, nt, dp),
        )
        self.up1 = nn.Sequential(
            *[ResBlock3D(4 * c if i == 0 else 2 * c, 2 * c, nt, dp) for i in range(n)],
            Upsample2D(2 * c, 2 * c),
            ResBlock3D(2 * c, 2 * c, nt, dp),
        )
        self.layer = nn.Sequential(ResBlock3D(2 * c, c, nt, dp), ResBlock3D(c, c, nt, dp))
        k = cfg.connect_res_layer_num
        self.connect_l1 = nn.Sequential(
            *[ResBlock3D(c, c, nt, dp) for _ in range(k)], Conv2dFrames(c, 12, 3, padding=1)
        )
        self.connect_l2 = nn.Sequential(
            *[ResBlock3D(c, c, nt, dp) for _ in range(k)], Conv2dFrames(c, 24, 3, padding=1)
        )
        self.norm_out = _norm(c, nt)
        self.conv_out = Conv2dFrames(c, 24, 3, padding=1)
        self.inverse_wavelet_tranform_l1 = InverseHaarWavelet2D()
        self.inverse_wavelet_tranform_l2 = InverseHaarWavelet3D()
        # Streaming look-ahead: one latent frame before the temporal upsampling, two after it.
        for mod in (self.conv_in, self.mid, self.up2[:-2], self.connect_l2):
            _set_offset(mod, 1)
        for mod in (self.up2[-2:], self.up1, self.connect_l1, self.layer):
            _set_offset(mod, 2)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, 4c + E, T, h, w)
        l2 = self.inverse_wavelet_tranform_l2(self.connect_l2(h[:, -self.e :]))  # (B, 3, 2T - 1, 2h, 2w)
        h = self.up2(h[:, : -self.e])  # (B, 4c + E, 2T - 1, 2h, 2w)
        l1_coeffs = self.connect_l1(h[:, -self.e :])  # (B, 12, ...)
        l1_coeffs = torch.cat([l1_coeffs[:, :3] + l2, l1_coeffs[:, 3:]], dim=1)
        l1 = self.inverse_wavelet_tranform_l1(l1_coeffs)  # (B, 3, 2T - 1, 4h, 4w)
        h = self.layer(self.up1(h[:, : -self.e]))
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, 24, 2T - 1, 4h, 4w)
        return torch.cat([h[:, :3] + l1, h[:, 3:]], dim=1)


def _set_offset(module: nn.Module, offset: int) -> None:
    for m in module.modules():
        if isinstance(m, CausalConv3d):
            m.cache_offset = offset


@dataclass
class Posterior:
    """The encoder's diagonal Gaussian. `parameters` (B, 2L, T, h, w) = [mean | logvar] before the clamp."""

    parameters: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.parameters.chunk(2, dim=1)[0]

    @property
    def logvar(self) -> torch.Tensor:
        return self.parameters.chunk(2, dim=1)[1].clamp(-30.0, 20.0)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(
        self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mean + std * eps; eps drawn from `generator` (on its own device) unless `noise` is given."""
        if noise is None:
            dev = generator.device if generator is not None else self.parameters.device
            noise = torch.randn(self.mean.shape, generator=generator, device=dev, dtype=self.parameters.dtype)
        noise = noise.to(self.parameters.device)
        return self.mean + torch.exp(0.5 * self.logvar) * noise


class WFVAE(nn.Module):
    """The OpenSoraPlan 1.3 WF-VAE. Videos (B, 3, 1 + 4k, 8h, 8w) in [-1, 1] <-> latents (B, L, 1 + k, h, w).

    Example: `z = vae.encode(video).mode(); rec = vae.decode(z, tiled=True)`.
    """

    t_chunk_enc = 16  # wavelet frames per encoder chunk (after the first frame alone)
    t_chunk_dec = 4  # latent frames per decoder chunk

    def __init__(self, cfg: WFVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.tiling = False
        self.register_buffer("_haar", _stack(haar3d_filters().values()), persistent=False)

    def enable_tiling(self, on: bool = True) -> None:
        """Chunked encode/decode by default (the release's `enable_tiling`); same result, less memory."""
        self.tiling = on

    def _stream(self, module: nn.Module, on: bool) -> None:
        for m in module.modules():
            if hasattr(m, "stream"):
                m.stream, m.cache = on, None

    @staticmethod
    def _chunks(t: int, size: int) -> list[tuple[int, int]]:
        """[(0, 1), (1, 1 + size), ...]: the first frame alone, then `size` frames at a time."""
        return [(0, 1)] + [(s, min(t, s + size)) for s in range(1, t, size)]

    def wavelet(self, video: torch.Tensor) -> torch.Tensor:
        """The input 3D Haar transform: (B, 3, T, H, W) -> (B, 24, (T + 1) / 2, H/2, W/2)."""
        return haar3d(video, self._haar)

    def inverse_wavelet(self, coeffs: torch.Tensor) -> torch.Tensor:
        """The output inverse 3D Haar transform: (B, 24, T, H, W) -> (B, 3, 2T - 1, 2H, 2W)."""
        return inverse_haar3d(coeffs, self._haar)

    def encode(self, video: torch.Tensor, tiled: bool | None = None) -> Posterior:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> the latent posterior (mean/logvar (B, L, 1 + k, H/8, W/8)).

        Example: `z = vae.encode(video).sample(generator=g)`.
        """
        t, hh, ww = video.shape[2:]
        if (t - 1) % 4 or hh % 8 or ww % 8:
            raise ValueError(
                f"WF-VAE input {tuple(video.shape)}: frames must be 1 + 4k and height/width multiples of 8"
            )
        coeffs = self.wavelet(video)
        tiled = self.tiling if tiled is None else tiled
        self._stream(self.encoder, tiled)
        try:
            if not tiled:
                return Posterior(self.encoder(coeffs))
            parts = [
                self.encoder(coeffs[:, :, a:b]) for a, b in self._chunks(coeffs.shape[2], self.t_chunk_enc)
            ]
            return Posterior(torch.cat(parts, dim=2))
        finally:
            self._stream(self.encoder, False)

    def decode_coeffs(self, z: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Latents (B, L, T, h, w) -> the decoder's wavelet coefficients (B, 24, 2T - 1, 4h, 4w)."""
        tiled = self.tiling if tiled is None else tiled
        self._stream(self.decoder, tiled)
        try:
            if not tiled:
                return self.decoder(z)
            t, parts = z.shape[2], []
            for a, b in self._chunks(t, self.t_chunk_dec):
                ahead = b + 1 < t  # decode one look-ahead latent frame, drop its two output frames
                out = self.decoder(z[:, :, a : b + 1] if ahead else z[:, :, a:b])
                parts.append(out[:, :, :-2] if ahead else out)
            return torch.cat(parts, dim=2)
        finally:
            self._stream(self.decoder, False)

    def decode(self, z: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Unscaled latents (B, L, T, h, w) -> video (B, 3, 4(T - 1) + 1, 8h, 8w), about [-1, 1].

        Example: `video = vae.decode(vae.unscale_latents(dit_latents))`.
        """
        return self.inverse_wavelet(self.decode_coeffs(z, tiled))

    def _affine(self, z):
        shape = (1, -1) + (1,) * (z.ndim - 2)
        scale = torch.tensor(self.cfg.scale, dtype=z.dtype, device=z.device).view(shape)
        shift = torch.tensor(self.cfg.shift, dtype=z.dtype, device=z.device).view(shape)
        return scale, shift

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the DiT's: (z - shift) * scale (the release's WFVAEModelWrapper.encode)."""
        scale, shift = self._affine(z)
        return (z - shift) * scale

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The DiT's latents -> VAE latents: z / scale + shift (before `decode`)."""
        scale, shift = self._affine(z)
        return z / scale + shift
