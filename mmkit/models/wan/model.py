"""Wan2.1 diffusion transformer (text-to-video and image-to-video), single-device PyTorch.

Holds the DiT only: patch embedding, time/text/image conditioning, the blocks and the head, as
numbered forward stages (`embed`, `blocks`, `head_tokens` + `unpatchify`) that `forward` composes and
that parallel plans and pipeline stages compose the same way. It does not hold the VAE, the text/image
encoders, the sampler, the loss or any parallelism; those live in `infer/`, `train/` and `parallel/`
and take this module as an argument. A tensor-parallel plan reaches in only through plain attributes
(`heads`, `attn_fn`, the lean path's `lean_tp` hooks); no mesh or process group is known here.

Numerics follow diffusers' `WanTransformer3DModel` (the reference of the parity tests): norm
statistics, modulation and the gated residual adds run in float32; everything else runs in the
weights' dtype. What differs is only overhead around the matmuls:
- in inference, one fused QKV matmul for self-attention and one fused KV matmul for cross-attention
  (the parameters stay separate q/k/v, as in diffusers, so tensor parallelism shards them by heads);
- RoPE as a real-valued rotation (no complex or float64 round trips), tables cached per grid (one
  cache per process keyed by grid, device and dtype: concurrent requests never share per-call state);
- patch embedding as one matmul over unfolded patches instead of a strided Conv3d;
- modulation as `addcmul` (one pass) instead of separate multiply and add.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkit.models.common.attention import attention
from mmkit.models.common.ops import Linear, linear
from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.recompute import HeadsLinear, NormedLinears, RecomputedMLP, RMSNormKeepInput

# Parameters kept in float32 when the model is cast to a low-precision dtype (as diffusers does):
# they feed the float32 modulation path and are tiny.
KEEP_FP32 = ("time_embed.", "time_proj.", "modulation", "norm_cross.")


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 [cos | sin] embedding, frequencies 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(
    grid: tuple[int, int, int],
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (S, head_dim) for a (frames, height, width) token grid.

    The head dim is split into frame/height/width parts (h = w = 2 * (head_dim // 6), frame gets
    the rest); each part rotates interleaved channel pairs (2i, 2i+1) by pos * theta^(-2i/d).
    `sin` carries the sign of the rotation (-sin on even channels, +sin on odd ones), so that
    rotate(x) = x * cos + swap_pairs(x) * sin. Computed in float64, stored in `dtype`.
    """
    f, h, w = grid
    dh = dw = 2 * (head_dim // 6)
    dt = head_dim - dh - dw
    angles = []
    for n, d in ((f, dt), (h, dh), (w, dw)):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
        angles.append(torch.outer(torch.arange(n, dtype=torch.float64), inv))  # (n, d/2)
    ang = torch.cat(
        [
            angles[0][:, None, None].expand(f, h, w, -1),
            angles[1][None, :, None].expand(f, h, w, -1),
            angles[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, head_dim // 2)  # (S, Dh/2)
    cos = ang.cos().repeat_interleave(2, dim=-1)
    sin = torch.stack([-ang.sin(), ang.sin()], dim=-1).flatten(-2)
    return cos.to(device, dtype), sin.to(device, dtype)


@functools.lru_cache(maxsize=8)
def cached_rope_tables(
    grid: tuple[int, int, int], head_dim: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_tables`, computed once per (grid, head_dim, device, dtype) for the whole process.

    A pure function of its key, so requests of different sizes running in one process (threads of a
    server, CFG branches) share entries safely; the tables are read-only (no caller writes to them).
    Example: `cos, sin = cached_rope_tables((21, 30, 52), 128, torch.device("cuda"), torch.bfloat16)`.
    """
    with torch.inference_mode(False):  # plain tensors, usable by a later training step too
        return rope_tables(grid, head_dim, device, dtype)


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS(x) over the last dim, (..., 1), statistics in float32, returned in x's dtype."""
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square() / x.shape[-1]
    return torch.rsqrt(ms + eps).to(x.dtype)


def norm_to_heads(
    x: torch.Tensor,
    norm: nn.RMSNorm,
    heads: int,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_input: bool = False,
) -> torch.Tensor:
    """RMSNorm across heads, then optional RoPE, written as contiguous (B, H, S, Dh) heads.

    x is (B, S, D), possibly a strided slice of a fused projection. The output is laid out the
    way the attention kernel reads fastest, and the norm, rotation and layout change cost three
    elementwise passes instead of a chain of copies.
    """
    B, S, D = x.shape
    if type(norm) is not nn.RMSNorm or (
        torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad)
    ):
        # autograd path (no in-place or out= ops); also any norm a parallel plan swapped in (e.g. the
        # tensor-parallel RMSNorm that reduces its statistics across the heads of all ranks).
        # keep_input (training, `WanBlock.recompute_hidden`): the norm keeps only x for backward.
        if keep_input and type(norm) is nn.RMSNorm:
            eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
            y = RMSNormKeepInput.apply(x, norm.weight, eps)
        else:
            y = norm(x)
        y = y.view(B, S, heads, D // heads).transpose(1, 2)
        if rope is not None:
            y = torch.addcmul(y * rope[0], y.unflatten(-1, (-1, 2)).flip(-1).flatten(-2), rope[1])
        return y.contiguous()
    y = x * norm.weight  # (B, S, D)
    y.mul_(rms_scale(x, norm.eps))
    y = y.view(B, S, heads, D // heads).transpose(1, 2)  # (B, H, S, Dh) view
    out = torch.empty(B, heads, S, D // heads, dtype=x.dtype, device=x.device)
    if rope is None:
        return out.copy_(y)
    cos, sin = rope  # (S, Dh)
    torch.mul(y, cos, out=out)
    return out.addcmul_(y.unflatten(-1, (-1, 2)).flip(-1).flatten(-2), sin)


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, D) -> contiguous (B, H, S, Dh)."""
    B, S, D = x.shape
    return x.view(B, S, heads, D // heads).transpose(1, 2).contiguous()


def project(x: torch.Tensor, *mods: nn.Linear) -> list[torch.Tensor]:
    """The outputs of several Linear layers on the same input.

    In inference (no autograd, plain tensors) they run as one matmul over the concatenated weights
    (the copy costs ~1% of the matmul and keeps no second set of weights alive); with autograd, or
    when a parallel plan made the weights distributed tensors, each layer runs on its own.
    """
    w = mods[0].weight
    if torch.is_grad_enabled() or type(w) is not nn.Parameter or type(w.data) is not torch.Tensor:
        return [m(x) for m in mods]
    y = linear(x, torch.cat([m.weight for m in mods]), torch.cat([m.bias for m in mods]))
    return list(y.split([m.out_features for m in mods], dim=-1))  # strided views


class WanSelfAttention(nn.Module):
    """Self-attention over the video tokens. `heads` is this process's head count (a tensor-parallel
    plan lowers it) and `attn_fn` the attention kernel (a context-parallel plan swaps it)."""

    attn_fn = staticmethod(attention)
    # A tensor-parallel plan's hooks for the lean path (`recompute_hidden`), None on plain tensors:
    # `weights(*linears)` this rank's plain weight/bias shards, `input(x)` this rank's plain input,
    # `row_linear(fn, args, linear)` a row-parallel output projection, `prologue(args)` the block's
    # norm arguments made ready for rank-local use.
    lean_tp = None

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)  # RMSNorm across all heads, as Wan does
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.out = Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], prenorm: tuple | None = None
    ) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D). `prenorm = (fn, args)`: attend over fn(x, *args), keeping less for
        backward (training, from `WanBlock` with `recompute_hidden`)."""
        B, S, _ = x.shape
        lean = prenorm is not None
        if lean:
            tp = self.lean_tp
            q, k, v = NormedLinears.apply(
                prenorm[0], len(prenorm[1]), _local(x, tp), *prenorm[1], *_wb(tp, self.q, self.k, self.v)
            )
        else:
            q, k, v = project(x, self.q, self.k, self.v)  # 3 x (B, S, D_local)
        q = norm_to_heads(q, self.norm_q, self.heads, rope, keep_input=lean)  # (B, H, S, Dh)
        k = norm_to_heads(k, self.norm_k, self.heads, rope, keep_input=lean)
        o = self.attn_fn(q, k, to_heads(v, self.heads))  # (B, H, S, Dh)
        if lean:
            return _row_linear(HeadsLinear.apply, (o,), self.out, self.lean_tp)
        return self.out(o.transpose(1, 2).reshape(B, S, -1))


class WanCrossAttention(nn.Module):
    """Attention from video tokens to text tokens (and, for i2v, to CLIP image tokens)."""

    lean_tp = None  # as WanSelfAttention's

    def __init__(self, dim: int, heads: int, eps: float, image: bool):
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.out = Linear(dim, dim)
        if image:
            self.k_img = Linear(dim, dim)
            self.v_img = Linear(dim, dim)
            self.norm_k_img = nn.RMSNorm(dim, eps=eps)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, ctx_img: torch.Tensor | None, prenorm: tuple | None = None
    ) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D); `prenorm` as in `WanSelfAttention.forward`."""
        B, S, _ = x.shape
        lean = prenorm is not None
        if lean:
            tp = self.lean_tp
            (q,) = NormedLinears.apply(
                prenorm[0], len(prenorm[1]), _local(x, tp), *prenorm[1], *_wb(tp, self.q)
            )
        else:
            q = self.q(x)
        q = norm_to_heads(q, self.norm_q, self.heads, keep_input=lean)  # (B, H, S, Dh)
        k, v = project(ctx, self.k, self.v)  # (B, L, D_local) each
        o = attention(q, norm_to_heads(k, self.norm_k, self.heads), to_heads(v, self.heads))
        if ctx_img is not None:
            ki, vi = project(ctx_img, self.k_img, self.v_img)
            o = o + attention(q, norm_to_heads(ki, self.norm_k_img, self.heads), to_heads(vi, self.heads))
        if lean:
            return _row_linear(HeadsLinear.apply, (o,), self.out, self.lean_tp)
        return self.out(o.transpose(1, 2).reshape(B, S, -1))


def _plain(*params: torch.Tensor) -> bool:
    """True for ordinary parameters (not distributed tensors a parallel plan made)."""
    return all(type(p) is nn.Parameter and type(p.data) is torch.Tensor for p in params)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _layer_norm(eps: float):
    """fn(x, weight, bias) = nn.LayerNorm's forward, as a prologue."""
    return lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, eps)


def _modulated_norm(eps: float):
    """fn(x, shift, scale) = `_modulate`, as a prologue."""
    return lambda x, shift, scale: _modulate(x, shift, scale, eps)


def _wb(tp, *mods: nn.Linear) -> list[torch.Tensor]:
    """weight, bias, weight, bias, ... of Linear layers (the inputs `NormedLinears` takes); this rank's
    plain shards through the plan's hooks `tp` when a tensor-parallel plan sharded them."""
    return tp.weights(*mods) if tp is not None else [t for m in mods for t in (m.weight, m.bias)]


def _local(x: torch.Tensor, tp) -> torch.Tensor:
    """A module input for the lean path: this rank's plain tensor through the plan's hooks `tp`."""
    return tp.input(x) if tp is not None else x


def _row_linear(fn, args: tuple, linear: nn.Linear, tp) -> torch.Tensor:
    """`fn(*args, weight, bias)`, a lean function ending in `linear`; under a tensor-parallel plan the
    plan's hooks `tp` run it on this rank's shard and combine the ranks' partial outputs."""
    if tp is None:
        return fn(*args, linear.weight, linear.bias)
    return tp.row_linear(fn, args, linear)


class WanMLP(nn.Module):
    """Linear, GELU (tanh approximation, fused into the first GEMM), Linear.

    In inference, long sequences run in row chunks of `chunk` tokens: the (chunk, hidden)
    intermediate stays small enough to be reused by the allocator and to stay in cache (the full
    one, e.g. 1950 x 8960 floats, is a fresh page-faulted mapping on every call) and peak memory
    drops by the same factor. Rows are independent, so the result is identical.
    In training, `prenorm` (from `WanBlock` with `recompute_hidden`) makes the hidden activations
    recomputed in backward, see `recompute.RecomputedMLP`.
    """

    chunk = 512
    lean_tp = None  # as WanSelfAttention's

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = Linear(dim, hidden, act="gelu_tanh")
        self.fc2 = Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor, prenorm: tuple | None = None) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D_out); with `prenorm = (fn, args)` the MLP of fn(x, *args) (training)."""
        S = x.shape[-2]
        if prenorm is not None:
            fn, args = prenorm
            tp = self.lean_tp
            w1, b1 = _wb(tp, self.fc1)

            def mlp(x, w2, b2):
                return RecomputedMLP.apply(fn, len(args), self.chunk, x, *args, w1, b1, w2, b2)

            return _row_linear(mlp, (_local(x, tp),), self.fc2, tp)
        if torch.is_grad_enabled() or S < 2 * self.chunk:
            return self.fc2(self.fc1(x))
        out = torch.empty(*x.shape[:-1], self.fc2.out_features, dtype=x.dtype, device=x.device)
        n = -(-S // self.chunk)  # equal chunks of at most `chunk` rows
        for i in range(n):
            rows = slice(i * S // n, (i + 1) * S // n)
            out[..., rows, :] = self.fc2(self.fc1(x[..., rows, :]))
        return out


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, in one layer_norm pass per sample.

    x (B, S, D) in the activation dtype; shift/scale (B, D) float32. The modulation enters as the
    norm's affine weight/bias, so statistics, scaling and shift run in float32 inside one kernel and
    the result is rounded once (as diffusers' float32 path does) with no float32 copy of x.
    """
    if x.shape[0] == 1:
        return F.layer_norm(x, x.shape[-1:], 1 + scale[0], shift[0], eps)
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = F.layer_norm(x[i], x.shape[-1:], 1 + scale[i], shift[i], eps)
    return out


class WanBlock(nn.Module):
    """Self-attention, cross-attention and MLP, each added to the residual stream (AdaLN-gated).

    `recompute_hidden` (set by selective activation checkpointing, parallel/ac.py): in training with
    plain or FSDP2-gathered parameters, or tensor-parallel shards whose modules carry the plan's
    `lean_tp` hooks, the block keeps 14 (tokens, width) tensors for backward instead of autograd's
    22 + 2 ffn/width (34 at Wan's widths): norm outputs and the MLP's hidden activations are
    recomputed in backward, the attention output is kept once (see `recompute.py`). Cost: one more
    fc1 matmul. Same forward, same gradients up to float rounding.
    """

    recompute_hidden = False

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.attn = WanSelfAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm_cross = nn.LayerNorm(dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross = WanCrossAttention(
            dim, cfg.num_attention_heads, cfg.eps, image=cfg.added_kv_proj_dim is not None
        )
        self.mlp = WanMLP(dim, cfg.ffn_dim)
        # shift/scale/gate for self-attention, then shift/scale/gate for the MLP
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,  # (B, S, D)
        e: torch.Tensor,  # (B, 6, D) float32 time projection
        ctx: torch.Tensor,  # (B, L, D) embedded text
        ctx_img: torch.Tensor | None,  # (B, L_img, D) embedded CLIP tokens (i2v)
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e).unbind(
            1
        )  # (B, D) float32
        gate1, gate2 = gate1[:, None].to(x.dtype), gate2[:, None].to(x.dtype)  # (B, 1, D)
        if (
            self.recompute_hidden
            and torch.is_grad_enabled()
            and (self.attn.lean_tp is not None or _plain(*self.parameters()))
        ):
            nc = self.norm_cross
            ln = isinstance(nc, nn.LayerNorm)
            args = [(shift1, scale1), (nc.weight, nc.bias) if ln else (), (shift2, scale2)]
            if self.attn.lean_tp is not None:  # e.g. gradients summed over the ranks' heads / MLP columns
                args = self.attn.lean_tp.prologue(args)
            mod = _modulated_norm(self.eps)
            x = torch.addcmul(x, self.attn(x, rope, prenorm=(mod, args[0])), gate1)
            x = x + self.cross(x, ctx, ctx_img, prenorm=(_layer_norm(nc.eps) if ln else _identity, args[1]))
            return torch.addcmul(x, self.mlp(x, prenorm=(mod, args[2])), gate2)
        x = torch.addcmul(x, self.attn(_modulate(x, shift1, scale1, self.eps), rope), gate1)
        x = x + self.cross(self.norm_cross(x), ctx, ctx_img)
        return torch.addcmul(x, self.mlp(_modulate(x, shift2, scale2, self.eps)), gate2)


class WanImageEmbedding(nn.Module):
    """CLIP penultimate-layer tokens (B, 257, image_dim) -> (B, 257, dim): LN, Linear, GELU, Linear, LN."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim)
        self.fc1 = Linear(image_dim, image_dim, act="gelu")  # exact GELU here
        self.fc2 = Linear(image_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim)) if pos_embed_seq_len else None
        )

    @staticmethod
    def _ln32(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(
            x.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # FLF2V: first and last frame tokens side by side
            x = x.reshape(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed
        return self._ln32(self.fc2(self.fc1(self._ln32(x, self.norm1))), self.norm2)


class WanTransformer(nn.Module):
    """The Wan2.1 DiT: latents (B, C, T, H, W) + timestep + text context -> prediction (B, C_out, T, H, W).

    Example:
        model = WanTransformer(FLAVORS["1.3B"])
        v = model(latents, torch.tensor([999.0]), text_context)  # text_context: (B, 512, 4096)
    """

    _repeated_blocks = ("blocks",)  # ModuleLists of identical blocks (activation checkpointing, FSDP units)
    _step_invariant = ("text_embed", "image_embed")  # inputs fixed over sampling (infer/accel/conditioning)
    # the output is the flow velocity v = noise - x0 for the input latents (first out_channels channels)
    # x = (1 - sigma) x0 + sigma noise, sigma = timestep / 1000 (the adaptive cache's "noise" forecast)
    _prediction = "flow"

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg.validate()
        dim, pt, ph, pw = cfg.dim, *cfg.patch_size
        # stored with Conv3d's weight shape (dim, C, pt, ph, pw) so checkpoints map 1:1; applied as a matmul
        self.patch_embed = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embed = WanMLP(cfg.text_dim, dim, dim)
        self.time_embed = nn.Module()
        self.time_embed.fc1 = Linear(cfg.freq_dim, dim)
        self.time_embed.fc2 = Linear(dim, dim)
        self.time_proj = Linear(dim, 6 * dim)
        self.image_embed = (
            WanImageEmbedding(cfg.image_dim, dim, cfg.pos_embed_seq_len)
            if cfg.image_dim is not None
            else None
        )
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = nn.Module()
        self.head.proj = Linear(dim, cfg.out_channels * pt * ph * pw)
        self.head.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    # ---- dtype handling -------------------------------------------------------------------
    def to_dtype(self, dtype: torch.dtype) -> WanTransformer:
        """Cast to `dtype`, keeping the small modulation/time parameters in float32 (as diffusers does)."""
        for name, p in self.named_parameters():
            keep = dtype != torch.float32 and any(k in name for k in KEEP_FP32)
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    # ---- forward stages (`forward` composes them; parallel plans and pipeline stages too) --------
    def rope(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype):
        """cos/sin tables (S, Dh) of a (frames, height, width) grid in patches (cached per process)."""
        grid = tuple(int(n) for n in grid)
        return cached_rope_tables(grid, self.cfg.attention_head_dim, torch.device(device), dtype)

    def grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """The token grid (frames, height, width) in patches of latents (B, C, T, H, W)."""
        return tuple(n // p for n, p in zip(latents.shape[2:], self.cfg.patch_size))

    def embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) timesteps in [0, 1000] -> temb (B, D) and the block projection (B, 6, D), float32."""
        w = self.time_embed.fc1.weight
        h = F.linear(
            sinusoidal_embedding(timestep, self.cfg.freq_dim).to(w.dtype), w, self.time_embed.fc1.bias
        )
        temb = self.time_embed.fc2(F.silu(h)).float()
        e = F.linear(F.silu(temb).to(self.time_proj.weight.dtype), self.time_proj.weight, self.time_proj.bias)
        return temb, e.float().unflatten(1, (6, -1))

    def embed_text(self, text_context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """umT5 features -> (B, L, D). A list of (L_i, text_dim) tensors is zero-padded to `text_len`,
        exactly as Wan2.1 and diffusers pad prompts (padding tokens are attended to, not masked)."""
        if isinstance(text_context, (list, tuple)):
            n = self.cfg.text_len
            text_context = torch.stack([F.pad(u[:n], (0, 0, 0, n - min(len(u), n))) for u in text_context])
        return self.text_embed(text_context.to(self.dtype))

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, S, D) tokens via one matmul over unfolded patches."""
        B, C, T, H, W = latents.shape
        pt, ph, pw = self.cfg.patch_size
        x = latents.to(self.dtype).reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, -1, C * pt * ph * pw)  # (B, S, C*pt*ph*pw)
        return linear(x, self.patch_embed.weight.flatten(1), self.patch_embed.bias)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, S, C_out*pt*ph*pw) -> (B, C_out, T, H, W)."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], -1, f * pt, h * ph, w * pw)

    def check_input(self, latents: torch.Tensor, image_context: torch.Tensor | None) -> None:
        """Clear errors for shapes the model cannot take (raised before any compute)."""
        cfg = self.cfg
        if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
            raise ValueError(
                f"latents: expected (B, {cfg.in_channels}, T, H, W), got {tuple(latents.shape)}"
                + (
                    " (i2v models take noise + mask + image latents concatenated)"
                    if cfg.in_channels == 36
                    else ""
                )
            )
        for n, p, name in zip(latents.shape[2:], cfg.patch_size, ("T", "H", "W")):
            if n % p:
                raise ValueError(f"latents: {name}={n} is not a multiple of the patch size {p}")
        if (image_context is None) != (self.image_embed is None):
            need = "needs" if self.image_embed is not None else "takes no"
            raise ValueError(
                f"image_context: this model {need} CLIP image context (config image_dim={cfg.image_dim})"
            )

    # 1. embeddings: patch tokens, time, text (and CLIP image) conditioning
    def embed(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        text_context: torch.Tensor | list[torch.Tensor],
        image_context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs as `forward` takes them -> (x (B, S, D) tokens, temb (B, D) and e (B, 6, D) float32 time
        embeddings, ctx (B, L, D) text, ctx_img (B, L_img, D) CLIP image tokens or None)."""
        B = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(B)
        x = self.patchify(latents)  # (B, S, D)
        temb, e = self.embed_time(timestep)  # (B, D), (B, 6, D) float32
        ctx = self.embed_text(text_context)  # (B, L, D)
        ctx_img = self.image_embed(image_context.to(self.dtype)) if image_context is not None else None
        return x, temb, e, ctx, ctx_img

    # 2. blocks: `self.blocks`, each `block(x, e, ctx, ctx_img, rope)`

    # 3. head: modulated norm and projection (unpatchify turns its tokens into a video)
    def head_tokens(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Block output (B, S, D) and temb (B, D) -> predicted tokens (B, S, C_out * pt * ph * pw)."""
        shift, scale = (self.head.modulation.float() + temb.unsqueeze(1)).unbind(1)  # (B, D) float32
        return self.head.proj(_modulate(x, shift, scale, self.cfg.eps))

    def forward(
        self,
        latents: torch.Tensor,  # (B, C_in, T, H, W)
        timestep: torch.Tensor | float,  # scalar or (B,), in [0, 1000]
        text_context: torch.Tensor | list[torch.Tensor],  # (B, L, text_dim) or list of (L_i, text_dim)
        image_context: torch.Tensor | None = None,  # (B, 257, image_dim) CLIP features, i2v only
    ) -> torch.Tensor:
        self.check_input(latents, image_context)
        grid = self.grid(latents)
        x, temb, e, ctx, ctx_img = self.embed(latents, timestep, text_context, image_context)
        rope = self.rope(grid, latents.device, x.dtype)
        for block in self.blocks:
            x = block(x, e, ctx, ctx_img, rope)
        return self.unpatchify(self.head_tokens(x, temb), grid).float()
