"""Qwen2 decoder with grouped-query attention and multimodal RoPE (M-RoPE).

M-RoPE: each token has three positions (time, height, width). Of the head_dim/2 rotary frequency
pairs, the first `mrope_section[0]` rotate with the time position, the next `mrope_section[1]` with
the height and the last `mrope_section[2]` with the width. For text all three positions are equal,
which makes it plain 1-D RoPE.

Packed sequences (training): with `cu_seqlens` the batch is one flat row (1, N) holding several samples
back to back, sample i at [cu_seqlens[i], cu_seqlens[i + 1]); attention is causal inside each sample
and never crosses into another, so no padding is computed and no (N, N) mask is built.

KV-cache interface (the cache itself lives in `mmkit/infer/`, never here): a `cache` object passed to
`forward` must have `update(layer_idx, k, v) -> (k_all, v_all)`, taking this step's keys/values
(B, H_kv, S, Dh) and returning everything to attend to (B, H_kv, S_past + S, Dh).
"""

from __future__ import annotations

import torch
from torch import nn

from mmkit.models.common.attention import attention
from mmkit.models.common.ops import Linear
from mmkit.models.qwen2_5_vl.config import TextConfig
from mmkit.models.qwen2_5_vl.vision import RMSNorm, SwiGLU, rotate_half


class MRoPE(nn.Module):
    """(3, B, S) positions -> cos, sin of shape (B, S, head_dim).

    The inverse frequencies are kept in fp32 outside the state dict (not a buffer), so `.to(bf16)`
    or loading on the meta device never touches them.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dim, self.theta, self.section = cfg.head_dim, cfg.rope_theta, tuple(cfg.mrope_section)
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """inv_freq (Dh/2,) fp32 and axis (Dh/2,) in {0, 1, 2}: which of (t, h, w) drives each pair."""
        if self._tables is None or self._tables[0].device != device:
            inv_freq = 1.0 / (
                self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim)
            )
            axis = torch.repeat_interleave(
                torch.arange(3, device=device), torch.tensor(self.section, device=device)
            )
            self._tables = (inv_freq, axis)
        return self._tables

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, axis = self.tables(position_ids.device)
        pos = position_ids[axis].float()  # (Dh/2, B, S)
        freqs = pos.permute(1, 2, 0) * inv_freq  # (B, S, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def packed_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]
) -> torch.Tensor:
    """Causal attention inside each segment [cu[i], cu[i+1]) of one packed row.

    q: (1, H, N, Dh); k, v: (1, H_kv, N, Dh) -> (1, H, N, Dh). One SDPA call per segment: its cost is
    sum(len_i^2), never N^2. Example: `packed_causal_attention(q, k, v, [0, 7, 12])`.
    """
    outs = [
        attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
        for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class TextAttention(nn.Module):
    """GQA self-attention with M-RoPE. `heads` / `kv_heads` are this process's head counts (a tensor-
    parallel plan lowers them); `packed_attn` is the kernel for packed rows (a context-parallel plan swaps it)."""

    packed_attn = staticmethod(packed_causal_attention)

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_proj = Linear(cfg.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, keep: int = 0, cu_seqlens: list[int] | None = None):
        """x: (B, S, D) -> (B, S_q, D), S_q = `keep` last positions if keep > 0 else S.

        Keys/values are always computed for all S positions (the cache needs them); queries only for
        the positions whose output is used, which lets the last layer skip most of its work.
        """
        b, s, _ = x.shape
        xq = x[:, -keep:] if keep else x
        sq = xq.shape[1]
        q = self.q_proj(xq).view(b, sq, self.heads, self.head_dim).transpose(1, 2)  # (B, H, Sq, Dh)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, Dh)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, Dh)
        q = q * cos[:, :, -sq:] + rotate_half(q) * sin[:, :, -sq:]
        k = k * cos + rotate_half(k) * sin
        if cu_seqlens is not None:  # packed row (B = 1, no cache): per-sample causal attention
            out = self.packed_attn(q, k, v, cu_seqlens)
            return self.o_proj(out.transpose(1, 2).reshape(b, sq, -1))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # mask None: causal over the keys, queries aligned to the END of the keys (a single query sees
        # every key). Otherwise bool (B, 1, S, S_k), True = attend; its last Sq rows are used.
        causal = False
        if mask is not None:
            mask = mask[:, :, -sq:]
        elif sq > 1 and sq == k.shape[2]:
            causal = True  # SDPA's built-in causal mask is aligned to the start; same thing here
        elif sq > 1:
            n_k = k.shape[2]
            mask = torch.ones(sq, n_k, dtype=torch.bool, device=x.device).tril(n_k - sq)
        out = attention(q, k, v, mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, sq, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = TextAttention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, keep: int = 0, cu_seqlens: list[int] | None = None):
        h = self.attn(self.attn_norm(x), cos, sin, mask, cache, keep, cu_seqlens)
        x = (x[:, -keep:] if keep else x) + h
        return x + self.mlp(self.mlp_norm(x))


class TextModel(nn.Module):
    """Embeddings -> decoder layers -> final norm -> (selected) logits."""

    def __init__(self, cfg: TextConfig, tie_word_embeddings: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = MRoPE(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache=None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        cu_seqlens: list[int] | None = None,
    ) -> torch.Tensor:
        """(B, S, D) embeddings + (3, B, S) positions -> logits (B, S', vocab).

        `mask`: None for causal attention without padding (queries aligned to the end of the keys), else
        bool (B, 1, S, S_k), True = attend.
        `logits_to_keep`: 0 = logits at every position, n > 0 = only the last n (prefill needs 1).
        `return_hidden`: return the final-normed hidden states (B, S', D) instead of logits (for
        heads applied outside, e.g. the engine's screened greedy argmax, or the training loss that only
        needs logits at supervised positions).
        `cu_seqlens`: packed row (B = 1): sample boundaries [0, ..., S] (ints); attention stays inside
        each sample. Excludes `mask`, `cache` and `logits_to_keep`.
        Example: `logits = text(embeds, pos, logits_to_keep=1)`.
        """
        if cu_seqlens is not None:
            assert embeds.shape[0] == 1 and mask is None and cache is None and not logits_to_keep
            assert cu_seqlens[0] == 0 and cu_seqlens[-1] == embeds.shape[1], (cu_seqlens, embeds.shape)
        cos, sin = self.rope(position_ids, embeds.dtype)
        x = self.decode(embeds, cos, sin, None, mask, cache, logits_to_keep, cu_seqlens)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layers=None,
        mask: torch.Tensor | None = None,
        cache=None,
        keep: int = 0,
        cu_seqlens: list[int] | None = None,
    ) -> torch.Tensor:
        """The decoder layers (default: all; a pipeline stage or a parallel plan passes its own) on
        embeddings x (B, S, D) with M-RoPE tables cos/sin (B, S, Dh); arguments as in `forward`.
        The last layer computes only the `keep` last positions (0 = all; its K/V still cover all).
        Example: `h = text.decode(embeds, *text.rope(pos, embeds.dtype))`.
        """
        layers = list(self.layers if layers is None else layers)
        for i, layer in enumerate(layers):
            x = layer(x, cos, sin, mask, cache, keep if i == len(layers) - 1 else 0, cu_seqlens)
        return x
