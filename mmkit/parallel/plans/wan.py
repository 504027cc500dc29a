"""Wan2.1 DiT: tensor + sequence parallel, context parallel (Ulysses / ring / hybrid), FSDP2.

Forward under a plan (`WanPlan.forward(prep)`), with S video tokens cut into `seq_shards` pieces:
  patchify, time/text/image embeddings (replicated)
  -> pad S to a multiple of cp x tp(SP), cut over cp ("local" backward), then over tp (SP)
  -> blocks: self-attention all-gathers the tp pieces (heads split over tp), runs context-parallel
     attention over cp (padding masked), reduce-scatters back; cross-attention and the MLP likewise
  -> head on this rank's tokens -> squared error against this rank's piece of the target, padding dropped.
TP shards (DTensor): q/k/v/out of both attentions, the image K/V, the MLP (column-wise in, row-wise out),
and Wan's q/k RMSNorm over all heads (`HeadShardedRMSNorm`). Replicated: embeddings, modulation,
cross-attention LayerNorm, head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkit.models.common.attention import attention
from mmkit.models.wan.model import _modulate
from mmkit.parallel.comm import copy_to_group, split_seq
from mmkit.parallel.dims import padded_len
from mmkit.parallel.plans import ParallelPlan
from mmkit.parallel.tp import HeadShardedRMSNorm, gather_inputs, shard_linears
from mmkit.train.tasks.wan import LossOut


def to_tokens(video: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, S, pt*ph*pw*C): the token layout the DiT head predicts (unpatchify's inverse)."""
    B, C, T, H, W = video.shape
    pt, ph, pw = patch
    x = video.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, (T // pt) * (H // ph) * (W // pw), -1)


class WanPlan(ParallelPlan):
    """Example: `plan = parallelize(task, dims, mesh, cfg); out = plan(task.prepare(batch, g))`."""

    def sp_partial_names(self) -> list[str]:
        return ["blocks.", "head."]

    def apply_tp(self) -> None:
        m, tp, sp = self.inner, self.tp_mesh, self.sp
        for block in m.blocks:
            for attn, col in (
                (block.attn, ["q", "k", "v"]),
                (block.cross, ["q", "k", "v", "k_img", "v_img"]),
            ):
                shard_linears(attn, tp, col, ["out"], sp)
                for name in ("norm_q", "norm_k", "norm_k_img"):
                    if hasattr(attn, name):
                        setattr(attn, name, HeadShardedRMSNorm(getattr(attn, name), tp))
                attn.heads //= self.dims.tp
            gather_inputs(block.attn, tp, 2, sp)  # (x, rope)
            gather_inputs(block.cross, tp, 3, sp)  # (x, ctx, ctx_img)
            shard_linears(block.mlp, tp, ["fc1"], ["fc2"], sp)
            gather_inputs(block.mlp, tp, 1, sp)

    def setup_cp(self) -> None:
        pass  # the self-attention kernel is set per forward (`_self_attention`), see `forward`

    def _self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention over this rank's piece of the sequence; padded keys never attended."""
        if self.cp_attn is not None:
            return self.cp_attn.attention(q, k, v, valid_len=self._valid)
        n = self._valid
        return attention(q, k[:, :, :n], v[:, :, :n])

    def forward(self, prep: dict) -> LossOut:
        m = self.inner
        lat, target, weight = prep["latents"], prep["target"], prep.get("weight")
        m.check_input(lat, prep.get("image_context"))
        B = lat.shape[0]
        patch = m.cfg.patch_size
        grid = tuple(n // p for n, p in zip(lat.shape[2:], patch))
        timestep = torch.as_tensor(prep["timestep"], device=lat.device).reshape(-1).expand(B)

        x = m.patchify(lat)  # (B, S, D), replicated
        temb, e = m.embed_time(timestep)
        ctx = m.embed_text(prep["text_context"])
        clip = prep.get("image_context")
        ctx_img = m.image_embed(clip.to(m.dtype)) if clip is not None else None
        cos, sin = m._rope(grid, lat.device, x.dtype)  # (S, Dh)

        S = x.shape[1]
        S_pad = padded_len(S, self.dims.seq_shards)
        tgt = to_tokens(target.float(), patch)  # (B, S, C_out * patch)
        valid = torch.ones(S_pad, dtype=torch.bool, device=x.device)
        valid[S:] = False
        if S_pad > S:  # padded tokens are zeros, masked as keys and dropped from the loss
            x = F.pad(x, (0, 0, 0, S_pad - S))
            tgt = F.pad(tgt, (0, 0, 0, S_pad - S))
            cos = F.pad(cos, (0, 0, 0, S_pad - S), value=1.0)
            sin = F.pad(sin, (0, 0, 0, S_pad - S))
        self._valid = S
        for block in m.blocks:
            attn = getattr(block, "_checkpoint_wrapped_module", block).attn
            attn.attn_fn = self._self_attention

        # cut the sequence: over cp (attention pieces), then over tp (sequence-parallel pieces)
        x = split_seq(x, 1, self.cp_group, backward="local")
        cos, sin = (split_seq(t, 0, self.cp_group) for t in (cos, sin))
        tgt, valid = split_seq(tgt, 1, self.cp_group), split_seq(valid, 0, self.cp_group)
        if self.sp:
            x = split_seq(x, 1, self.tp_group, backward="gather")
            tgt, valid = split_seq(tgt, 1, self.tp_group), split_seq(valid, 0, self.tp_group)
            # computed identically on every tp rank, used on this rank's tokens: complete gradients upstream
            e, temb = copy_to_group(e, self.tp_group), copy_to_group(temb, self.tp_group)

        for block in m.blocks:
            x = block(x, e, ctx, ctx_img, (cos, sin))
        shift, scale = (m.head.modulation.float() + temb.unsqueeze(1)).unbind(1)  # (B, D) float32
        pred = m.head.proj(_modulate(x, shift, scale, m.cfg.eps))  # (B, S_local, C_out * patch)

        err = (pred.float() - tgt).pow(2) * valid[None, :, None]
        if weight is not None:
            err = err * weight.float().view(-1, 1, 1)
        n_valid = int(valid.sum())
        return LossOut(err.sum(), n_valid * B * tgt.shape[-1], B, n_valid * B)
