"""Qwen2.5-VL vision encoder: a ViT over (2 x 14 x 14) patches with 2-D rotary, window attention and a
2x2 patch merger into the LLM width.

Images and videos of any size are packed into ONE sequence of patches (no padding). Attention is
block-diagonal: in most blocks each 112x112-pixel window (8x8 patches) attends only to itself; in the
`fullatt_block_indexes` blocks each frame attends to itself. Segments of equal length are batched into
one attention call, so a 448x448 image costs one call per block.

Patch order (as the processor emits it): for each image/video, frames (t) outermost, then the merged
2x2 blocks in row-major order, then the 4 patches of a block (row-major). Each patch is a flattened
(C, T, P, P) pixel cube. This file knows nothing of tokens or text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.models.common.attention import attention
from mmkit.models.common.ops import Linear
from mmkit.models.qwen2_5_vl.config import VisionConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as the reference does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); `bias` is True in the vision tower, False in the LLM."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SegmentPlan:
    """Block-diagonal attention over a packed sequence cut into segments [cu[i], cu[i+1]).

    Segments are grouped by length; each group runs as one batched attention call. Built once per
    forward and shared by all blocks that use the same segmentation.
    """

    def __init__(self, cu_seqlens: list[int], device: torch.device):
        lengths = [e - s for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]) if e > s]
        starts = [s for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]) if e > s]
        self.uniform = len(set(lengths)) == 1  # fast path: a plain reshape, no gather
        self.groups: list[tuple[int, torch.Tensor]] = []
        if self.uniform:
            self.length = lengths[0]
            return
        by_len: dict[int, list[int]] = {}
        for s, n in zip(starts, lengths):
            by_len.setdefault(n, []).append(s)
        for n, ss in by_len.items():
            idx = torch.tensor(ss, device=device).view(-1, 1) + torch.arange(n, device=device)  # (num_seg, n)
            self.groups.append((n, idx))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (N, H, D) packed -> (N, H, D)."""
        n_tok, heads, dim = q.shape
        if self.uniform:
            shape = (n_tok // self.length, self.length, heads, dim)
            qs, ks, vs = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (S, H, L, D)
            return attention(qs, ks, vs).transpose(1, 2).reshape(n_tok, heads, dim)
        out = torch.empty_like(q)
        for _, idx in self.groups:
            qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # (S, H, L, D)
            out[idx] = attention(qs, ks, vs).transpose(1, 2)
        return out


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: SegmentPlan
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # each (N, H, Dh)
        # 2-D rotary in fp32 (cos/sin: (N, 1, Dh)), cast back like the reference.
        qf, kf = q.float(), k.float()
        q = (qf * cos + rotate_half(qf) * sin).to(x.dtype)
        k = (kf * cos + rotate_half(kf) * sin).to(x.dtype)
        return self.proj(plan(q, k, v).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, plan):
        x = x + self.attn(self.norm1(x), cos, sin, plan)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 group of patches (4 * width) -> MLP -> LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.unit = cfg.spatial_merge_size**2
        wide = cfg.hidden_size * self.unit
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fc1 = Linear(wide, wide)
        self.fc2 = Linear(wide, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).view(-1, self.fc1.in_features)  # (N/4, 4 * width)
        return self.fc2(F.gelu(self.fc1(x)))


class VisionTransformer(nn.Module):
    """Packed pixels (N, C*T*P*P) + grids (n, 3) -> merged features (N/4, out_hidden_size)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        # The reference's Conv3d with kernel = stride = patch is exactly this matmul on flattened cubes.
        self.patch_embed = Linear(patch_dim, cfg.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self._inv_freq: torch.Tensor | None = None  # fp32, outside the state dict (see inv_freq)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """(Dh/4,) fp32 rotary inverse frequencies; h and w each get half of the Dh/2 rotary pairs."""
        if self._inv_freq is None or self._inv_freq.device != device:
            half = self.cfg.head_dim // 2
            steps = torch.arange(0, half, 2, dtype=torch.float32, device=device)
            self._inv_freq = 1.0 / (self.cfg.rope_theta ** (steps / half))
        return self._inv_freq

    def _layout(self, grid_thw: list[tuple[int, int, int]], device):
        """Per-patch (h, w) rotary positions, the window permutation (over 2x2 units), and segment cuts."""
        m = self.cfg.spatial_merge_size
        ws = self.cfg.window_size // m // self.cfg.patch_size  # window side in merged units (4)
        pos, order, win_cu, frame_cu = [], [], [0], [0]
        offset = 0  # merged units seen so far
        for t, h, w in grid_thw:
            gh, gw = h // m, w // m
            # (h, w) of every patch in processor order (t, gh, gw, m, m).
            hh = torch.arange(gh).view(gh, 1, 1, 1) * m + torch.arange(m).view(1, 1, m, 1)
            ww = torch.arange(gw).view(1, gw, 1, 1) * m + torch.arange(m).view(1, 1, 1, m)
            hw = torch.stack(torch.broadcast_tensors(hh, ww), dim=-1).reshape(-1, 2)  # (h*w, 2)
            pos.append(hw.repeat(t, 1))
            # Windows of ws x ws merged units per frame, row-major; ragged windows at the right/bottom.
            nh, nw = -(-gh // ws), -(-gw // ws)
            idx = torch.arange(t * gh * gw).view(t, gh, gw)
            idx = F.pad(idx, (0, nw * ws - gw, 0, nh * ws - gh), value=-1)
            idx = idx.view(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
            counts = (idx >= 0).sum(1).tolist()
            order.append(idx[idx >= 0] + offset)
            for c in counts:
                if c:
                    win_cu.append(win_cu[-1] + c * m * m)
            base = frame_cu[-1]
            frame_cu.extend(base + (i + 1) * h * w for i in range(t))  # full attention is per frame
            offset += t * gh * gw
        pos = torch.cat(pos).to(device)
        order = torch.cat(order).to(device)
        return pos, order, SegmentPlan(win_cu, device), SegmentPlan(frame_cu, device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        n_patch = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != n_patch:
            raise ValueError(
                f"vision: pixel_values has {pixel_values.shape[0]} patches but grid_thw {grids} needs {n_patch}"
            )
        m = self.cfg.spatial_merge_size
        odd = [g for g in grids if g[1] % m or g[2] % m]
        if odd:
            raise ValueError(f"vision: grid_thw {odd} has h or w not divisible by spatial_merge_size={m}")
        dev = pixel_values.device
        pos, order, win_plan, full_plan = self._layout(grids, dev)
        unit = self.cfg.spatial_merge_size**2
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (N, D)
        # Reorder 2x2 units so that each window is contiguous; frames stay contiguous too.
        x = x.view(-1, unit, x.shape[-1])[order].reshape(n_patch, -1)
        pos = pos.view(-1, unit, 2)[order].reshape(n_patch, 2)
        freqs = pos[..., None].float() * self.inv_freq(dev)  # (N, 2, Dh/4)
        freqs = freqs.flatten(1)  # (N, Dh/2): h frequencies then w frequencies
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (N, 1, Dh)
        cos, sin = emb.cos(), emb.sin()
        full = set(self.cfg.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, full_plan if i in full else win_plan)
        merged = self.merger(x)  # (N/4, out) in window order
        return merged[torch.argsort(order)]
