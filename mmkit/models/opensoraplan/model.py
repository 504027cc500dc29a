"""OpenSoraPlan 1.3 diffusion transformer (text-to-video and the i2v inpainting variant), single-device.

Holds the DiT only: patch embedding (and, for i2v, the masked-video and mask branches), adaLN-single
time conditioning, the caption projection, the blocks with Skiparse self-attention and the head, as
forward stages (`embed`, `biases`, `blocks`, `head_tokens` + `unpatchify`) that `forward` composes and
that parallel plans and pipeline stages compose the same way. It does not hold the WF-VAE, mT5, the
sampler, the loss or any parallelism.

Numerics follow the original `OpenSoraT2V_v1_3` / `OpenSoraInpaint_v1_3` (Open-Sora-Plan v1.3.1), the
reference of the parity tests; everything runs in the weights' dtype, as there:
- PixArt-style blocks: LayerNorm (no affine) + adaLN-single modulation around self-attention and the
  MLP, cross-attention to the caption with no pre-norm and no gate;
- RoPE-3D (t, h, w thirds of each head, rotate-half pairs) in self-attention only;
- masks as additive biases: 0 for real, -10000 for padded video patches / text tokens, and -9980 for
  the tokens Skiparse appends to reach a multiple of k^2;
- Skiparse (k = `sparse_n`) on layers 2..29: even layers "single" (token i attends to tokens j with
  i = j mod k), odd layers "group" (to tokens with the same (i // k) mod k). Both are a fixed
  permutation of the padded sequence into k independent groups, regrouped into the batch.
Cross-attention is per query, so the original's regrouping of its queries is an identity there and
mmkit runs it dense.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkit.models.common.attention import attention
from mmkit.models.opensoraplan.config import OSPConfig

MASK_BIAS = -10000.0  # bias of a padded video patch or text token (the original's value)
SKIPARSE_PAD_BIAS = -9980.0  # bias of the tokens Skiparse appends (the original's value)


# ---------------------------------------------------------------------------------------------------
# Position and time embeddings
# ---------------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 [cos | sin], frequencies 10000^(-i/half) (diffusers `Timesteps`
    with flip_sin_to_cos=True, downscale_freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope3d_tables(
    grid: tuple[int, int, int],
    head_dim: int,
    scales: tuple[float, float, float],
    device: torch.device,
    dtype: torch.dtype,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (S, head_dim) of a (frames, height, width) token grid for RoPE-3D.

    The head dim is split into equal thirds for t, h and w; each third of size d rotates the pairs
    (c, c + d/2) by pos / scale * theta^(-2c/d) ("rotate half"). Tokens run t, then h, then w.
    Example: `cos, sin = rope3d_tables((24, 40, 80), 96, (1, 1, 1), torch.device("cpu"), torch.float32)`.
    """
    d = head_dim // 3
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)  # (d/2,)
    parts = []
    for axis, (n, s) in enumerate(zip(grid, scales)):
        f = torch.outer(torch.arange(n, dtype=torch.float32, device=device) / s, inv).to(dtype)  # (n, d/2)
        f = torch.cat([f, f], dim=-1)  # (n, d)
        shape = [1, 1, 1, d]
        shape[axis] = n
        parts.append(f.view(shape).expand(*grid, d))
    ang = torch.cat(parts, dim=-1).reshape(-1, 3 * d)  # (S, Dh)
    return ang.cos(), ang.sin()


def apply_rope3d(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, H, S, Dh) rotated by tables (S, Dh): x * cos + rotate_half_per_third(x) * sin."""
    cos, sin = rope
    x3 = x.unflatten(-1, (3, 2, -1))  # (B, H, S, 3, 2, d/2): thirds, halves
    rot = torch.stack([-x3[..., 1, :], x3[..., 0, :]], dim=-2).flatten(-3)
    return x * cos + rot * sin


# ---------------------------------------------------------------------------------------------------
# Skiparse: a fixed permutation of the (padded) sequence into k groups, regrouped into the batch
# ---------------------------------------------------------------------------------------------------
def skiparse_pad(n: int, k: int) -> int:
    """Tokens Skiparse appends to a sequence of n tokens (to a multiple of k^2)."""
    return -n % (k * k)


def skiparse_regroup(x: torch.Tensor, mode: str, k: int) -> torch.Tensor:
    """(B, H, S, X) with S a multiple of k^2 -> (k*B, H, S/k, X); group g of sample b at batch g*B + b.

    single: token i = g' * k + g goes to group g = i mod k (stride-k tokens attend to each other);
    group: token i = n * k^2 + g * k + j goes to group g = (i // k) mod k (runs of k tokens, k^2 apart).
    """
    B, H, S, X = x.shape
    if mode == "single":
        y = x.view(B, H, S // k, k, X).permute(3, 0, 1, 2, 4)  # (k, B, H, S/k, X)
    else:
        y = x.view(B, H, S // (k * k), k, k, X).permute(3, 0, 1, 2, 4, 5)  # (k, B, H, n, j, X)
    return y.reshape(k * B, H, S // k, X)


def skiparse_restore(y: torch.Tensor, mode: str, k: int) -> torch.Tensor:
    """Inverse of `skiparse_regroup`: (k*B, H, S/k, X) -> (B, H, S, X)."""
    kB, H, G, X = y.shape
    B = kB // k
    if mode == "single":
        x = y.view(k, B, H, G, X).permute(1, 2, 3, 0, 4)  # (B, H, S/k, k, X)
    else:
        x = y.view(k, B, H, G // k, k, X).permute(1, 2, 3, 0, 4, 5)  # (B, H, n, g, j, X)
    return x.reshape(B, H, G * k, X)


def skiparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    mode: str | None,
    n: int,
    attn_fn=attention,
) -> torch.Tensor:
    """Self-attention of (B, H, S, Dh) q/k/v under a key bias (B, S) (None = all real), dense
    (`mode` None) or Skiparse "single"/"group" with k = `n`; returns (B, H, S, Dh).

    Example: `o = skiparse_attention(q, k, v, bias, "group", 4)`.
    """
    B, _, S, _ = q.shape
    if mode is None:
        return attn_fn(q, k, v, None if bias is None else bias[:, None, None, :].to(q.dtype))
    pad = skiparse_pad(S, n)
    if bias is None and pad:
        bias = q.new_zeros(B, S)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        bias = F.pad(bias.to(q.dtype), (0, pad), value=SKIPARSE_PAD_BIAS)
    q, k, v = (skiparse_regroup(t, mode, n) for t in (q, k, v))
    mask = None
    if bias is not None:  # (B, S') -> (k*B, 1, 1, S'/k)
        mask = skiparse_regroup(bias.to(q.dtype)[:, None, :, None], mode, n).transpose(2, 3)
    o = skiparse_restore(attn_fn(q, k, v, mask), mode, n)
    return o[:, :, :S]


# ---------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------
def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, D) -> (B, H, S, Dh)."""
    B, S, D = x.shape
    return x.view(B, S, heads, D // heads).transpose(1, 2)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, Dh) -> (B, S, D)."""
    B, H, S, Dh = x.shape
    return x.transpose(1, 2).reshape(B, S, H * Dh)


class OSPSelfAttention(nn.Module):
    """Self-attention over the video tokens with RoPE-3D; dense or Skiparse (`skiparse`, k = `sparse_n`).

    `heads` is this process's head count (a tensor-parallel plan lowers it); `attn_fn` the kernel a
    dense layer and each Skiparse group run (a context-parallel plan swaps `core`, see docs/parallel.md).
    """

    attn_fn = staticmethod(attention)

    def __init__(self, dim: int, heads: int, skiparse: str | None, sparse_n: int):
        super().__init__()
        self.heads = heads
        self.skiparse = skiparse
        self.sparse_n = sparse_n
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def core(self, q, k, v, bias):
        """(B, H, S, Dh) q/k/v (RoPE applied) and key bias (B, S) -> (B, H, S, Dh)."""
        return skiparse_attention(q, k, v, bias, self.skiparse, self.sparse_n, self.attn_fn)

    def forward(self, x: torch.Tensor, rope, bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D); `rope` cos/sin (S, Dh); `bias` (B, S) additive key bias or None."""
        q = apply_rope3d(to_heads(self.q(x), self.heads), rope)
        k = apply_rope3d(to_heads(self.k(x), self.heads), rope)
        o = self.core(q, k, to_heads(self.v(x), self.heads), bias)
        return self.out(from_heads(o))


class OSPCrossAttention(nn.Module):
    """Attention from the video tokens to the projected caption, masked by a text bias (B, L)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (
            to_heads(self.q(x), self.heads),
            to_heads(self.k(ctx), self.heads),
            to_heads(self.v(ctx), self.heads),
        )
        mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
        return self.out(from_heads(attention(q, k, v, mask)))


class OSPMLP(nn.Module):
    """Linear, GELU (tanh approximation), Linear; hidden = 4 x dim (diffusers `FeedForward`)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class OSPBlock(nn.Module):
    """adaLN-modulated self-attention (gated), cross-attention (no norm, no gate), modulated MLP (gated)."""

    def __init__(self, cfg: OSPConfig, index: int):
        super().__init__()
        dim = cfg.hidden
        self.eps = cfg.norm_eps
        self.attn = OSPSelfAttention(dim, cfg.num_attention_heads, cfg.skiparse(index), cfg.sparse_n)
        self.cross = OSPCrossAttention(dim, cfg.num_attention_heads)
        self.mlp = OSPMLP(dim, 4 * dim)
        # shift/scale/gate for self-attention, then shift/scale/gate for the MLP
        self.modulation = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,  # (B, S, D)
        e: torch.Tensor,  # (B, 6, D) adaLN-single projection of the timestep
        ctx: torch.Tensor,  # (B, L, D) projected caption
        rope: tuple[torch.Tensor, torch.Tensor],  # (S, Dh) each
        vbias: torch.Tensor | None,  # (B, S) video key bias
        tbias: torch.Tensor | None,  # (B, L) text key bias
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(1)  # (B, D) each
        h = F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale1[:, None]) + shift1[:, None]
        x = gate1[:, None] * self.attn(h, rope, vbias) + x
        x = self.cross(x, ctx, tbias) + x
        h = F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale2[:, None]) + shift2[:, None]
        return gate2[:, None] * self.mlp(h) + x


class PatchEmbed(nn.Module):
    """Per-frame 2-D patch embedding (B, C, T, H, W) -> (B, T*h*w, D), a strided Conv2d; with
    `fc` (the i2v branches) followed by a bias-free Linear."""

    def __init__(self, in_channels: int, dim: int, patch: int, fc: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.fc = nn.Linear(dim, dim, bias=False) if fc else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        y = self.proj(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, D, h, w)
        y = y.unflatten(0, (B, T)).permute(0, 1, 3, 4, 2).reshape(B, -1, y.shape[1])  # (B, T*h*w, D)
        return self.fc(y) if self.fc is not None else y


class OpenSoraPlanTransformer(nn.Module):
    """The OpenSoraPlan 1.3 DiT: latents (B, C, T, H, W) + timestep + caption -> v-prediction.

    Example:
        model = OpenSoraPlanTransformer(FLAVORS["v1.3-2B"])
        v = model(latents, torch.tensor([999.0]), caption, caption_mask=mask)  # caption (B, 512, 4096)
    """

    _repeated_blocks = ("blocks",)  # ModuleLists of identical blocks (activation checkpointing, FSDP units)
    _step_invariant = ("text_embed",)  # input fixed over sampling (infer/accel/conditioning)

    def __init__(self, cfg: OSPConfig):
        super().__init__()
        self.cfg = cfg.validate()
        dim, p = cfg.hidden, cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.in_channels, dim, p)
        if cfg.i2v:  # masked-video latents and the compressed mask, each embedded then projected
            self.masked_embed = PatchEmbed(cfg.in_channels, dim, p, fc=True)
            self.mask_embed = PatchEmbed(cfg.vae_scale_factor_t, dim, p, fc=True)
        self.text_embed = OSPMLP(cfg.caption_channels, dim, dim)  # PixArt caption projection
        self.time_embed = nn.Module()
        self.time_embed.fc1 = nn.Linear(256, dim)
        self.time_embed.fc2 = nn.Linear(dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.blocks = nn.ModuleList(OSPBlock(cfg, i) for i in range(cfg.num_layers))
        self.head = nn.Module()
        self.head.proj = nn.Linear(dim, cfg.out_channels * p * p)
        self.head.modulation = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def latent_channels(self) -> int:
        """Input channels: 8, or for i2v 8 noisy + 8 masked-video + `vae_scale_factor_t` mask."""
        c = self.cfg
        return 2 * c.in_channels + c.vae_scale_factor_t if c.i2v else c.in_channels

    # ---- forward stages (`forward` composes them; parallel plans and pipeline stages too) --------
    def grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """The token grid (frames, height, width) in patches of latents (B, C, T, H, W)."""
        p = self.cfg.patch_size
        return latents.shape[2], latents.shape[3] // p, latents.shape[4] // p

    def rope(self, grid: tuple[int, int, int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        scales = (c.interpolation_scale_t, c.interpolation_scale_h, c.interpolation_scale_w)
        return rope3d_tables(
            tuple(int(n) for n in grid), c.attention_head_dim, scales, torch.device(device), dtype
        )

    def check_input(self, latents: torch.Tensor, caption: torch.Tensor) -> None:
        """Clear errors for shapes the model cannot take (raised before any compute)."""
        c = self.cfg
        want = self.latent_channels
        if latents.ndim != 5 or latents.shape[1] != want:
            raise ValueError(
                f"latents: expected (B, {want}, T, H, W), got {tuple(latents.shape)}"
                + (
                    " (i2v takes noisy + masked-video latents + compressed mask, concatenated)"
                    if c.i2v
                    else ""
                )
            )
        for n, name in zip(latents.shape[3:], ("H", "W")):
            if n % c.patch_size:
                raise ValueError(f"latents: {name}={n} is not a multiple of the patch size {c.patch_size}")
        if caption.shape[-1] != c.caption_channels or caption.ndim not in (3, 4):
            raise ValueError(
                f"caption: expected (B, L, {c.caption_channels}) or (B, 1, L, {c.caption_channels}) mT5 "
                f"features, got {tuple(caption.shape)}"
            )

    # 1. embeddings: patch tokens, time (adaLN-single), caption
    def embed(self, latents: torch.Tensor, timestep, caption: torch.Tensor):
        """-> x (B, S, D) tokens, temb (B, D) embedded timestep, e (B, 6, D) block modulation,
        ctx (B, L, D) projected caption."""
        c, B = self.cfg, latents.shape[0]
        latents = latents.to(self.dtype)
        if c.i2v:
            n = c.in_channels
            x = (
                self.patch_embed(latents[:, :n])
                + self.masked_embed(latents[:, n : 2 * n])
                + self.mask_embed(latents[:, 2 * n :])
            )
        else:
            x = self.patch_embed(latents)
        t = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(B)
        temb = self.time_embed.fc2(F.silu(self.time_embed.fc1(timestep_embedding(t).to(self.dtype))))
        e = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # (B, 6, D)
        if caption.ndim == 4:  # (B, 1, L, C), the original's layout
            caption = caption[:, 0]
        ctx = self.text_embed(caption.to(self.dtype))
        return x, temb, e, ctx

    def biases(
        self, video_mask: torch.Tensor | None, text_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """0/1 masks -> additive key biases: video (B, T, H, W) over latent pixels, max-pooled to patches
        -> (B, S); text (B, L) or (B, 1, L) -> (B, L). None stays None (nothing masked)."""
        vbias = tbias = None
        if video_mask is not None:
            p = self.cfg.patch_size
            m = F.max_pool3d(video_mask.to(self.dtype)[:, None], (1, p, p), (1, p, p)).flatten(1)  # (B, S)
            vbias = (1 - m.bool().to(self.dtype)) * MASK_BIAS
        if text_mask is not None:
            tbias = (1 - text_mask.reshape(text_mask.shape[0], -1).to(self.dtype)) * MASK_BIAS
        return vbias, tbias

    # 2. blocks: `self.blocks`, each `block(x, e, ctx, rope, vbias, tbias)`

    # 3. head: modulated norm and projection (unpatchify turns its tokens into a video)
    def head_tokens(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Block output (B, S, D) and temb (B, D) -> predicted tokens (B, S, C_out * p * p)."""
        shift, scale = (self.head.modulation + temb[:, None]).unbind(1)  # (B, D) each
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return self.head.proj(h)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, S, C_out*p*p) -> (B, C_out, T, H, W)."""
        f, h, w = grid
        p = self.cfg.patch_size
        x = x.reshape(x.shape[0], f, h, w, p, p, -1)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(x.shape[0], -1, f, h * p, w * p)

    def forward(
        self,
        latents: torch.Tensor,  # (B, C_in, T, H, W)
        timestep: torch.Tensor | float,  # scalar or (B,), in [0, 1000)
        caption: torch.Tensor,  # (B, L, caption_channels) or (B, 1, L, caption_channels) mT5 features
        video_mask: torch.Tensor | None = None,  # (B, T, H, W) 0/1 over latent pixels (1 = real)
        caption_mask: torch.Tensor | None = None,  # (B, L) or (B, 1, L) 0/1 tokenizer mask
    ) -> torch.Tensor:
        """The original's positional order (hidden_states, timestep, encoder_hidden_states,
        attention_mask, encoder_attention_mask); returns (B, C_out, T, H, W)."""
        self.check_input(latents, caption)
        grid = self.grid(latents)
        x, temb, e, ctx = self.embed(latents, timestep, caption)
        vbias, tbias = self.biases(video_mask, caption_mask)
        rope = self.rope(grid, latents.device, x.dtype)
        for block in self.blocks:
            x = block(x, e, ctx, rope, vbias, tbias)
        return self.unpatchify(self.head_tokens(x, temb), grid)
