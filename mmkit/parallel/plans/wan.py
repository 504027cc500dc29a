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

import math

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
            for mod in (block.attn, block.cross, block.mlp):  # selective AC's lean path on local shards
                mod.tp_mesh, mod.tp_sp = tp, sp

    def setup_cp(self) -> None:
        pass  # the self-attention kernel is installed per micro-batch (`local_rope`)

    def _self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention over this rank's piece of the sequence; padded keys never attended."""
        if self.cp_attn is not None:
            return self.cp_attn.attention(q, k, v, valid_len=self._valid)
        n = self._valid
        return attention(q, k[:, :, :n], v[:, :, :n])

    # ---- the three pieces of a sharded forward (also what pipeline stages call, `pp_stages.WanStage`) ----
    def local_rope(self, grid: tuple[int, int, int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This cp rank's (cos, sin) rows (S_pad / cp, Dh) for a latent grid in patches, and the state the
        attention kernel needs (the true token count S; keys past it are padding)."""
        cos, sin = self.inner._rope(tuple(grid), device, dtype)  # (S, Dh)
        S = cos.shape[0]
        pad = padded_len(S, self.dims.seq_shards) - S
        if pad:
            cos, sin = F.pad(cos, (0, 0, 0, pad), value=1.0), F.pad(sin, (0, 0, 0, pad))
        self._valid = S
        for block in self.inner.blocks:
            getattr(block, "_checkpoint_wrapped_module", block).attn.attn_fn = self._self_attention
        return split_seq(cos, 0, self.cp_group), split_seq(sin, 0, self.cp_group)

    def _local_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """A (B, S, ...) tensor (or (S,)) padded to S_pad and cut to this rank's tokens (cp, then tp with SP)."""
        dim = 1 if t.ndim > 1 else 0
        pad = padded_len(t.shape[dim], self.dims.seq_shards) - t.shape[dim]
        if pad:
            t = F.pad(t, (0, 0, 0, pad)) if dim == 1 else F.pad(t, (0, pad))
        t = split_seq(t, dim, self.cp_group)
        return split_seq(t, dim, self.tp_group) if self.sp else t

    def enter(self, x: torch.Tensor, e: torch.Tensor, temb: torch.Tensor):
        """Patch tokens (B, S, D), replicated, -> this rank's piece (padded tokens are zeros); the time
        embeddings e (B, 6, D) / temb (B, D) made ready for rank-local tokens."""
        pad = padded_len(x.shape[1], self.dims.seq_shards) - x.shape[1]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = split_seq(x, 1, self.cp_group, backward="local")
        if self.sp:
            x = split_seq(x, 1, self.tp_group, backward="gather")
            # computed identically on every tp rank, used on this rank's tokens: complete gradients upstream
            e, temb = copy_to_group(e, self.tp_group), copy_to_group(temb, self.tp_group)
        return x, e, temb

    def head_loss(
        self, x, temb, target: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """Head on this rank's tokens -> (summed squared error against its piece of `target`, real tokens)."""
        m = self.inner
        shift, scale = (m.head.modulation.float() + temb.unsqueeze(1)).unbind(1)  # (B, D) float32
        pred = m.head.proj(_modulate(x, shift, scale, m.cfg.eps))  # (B, S_local, C_out * patch)
        tgt = self._local_tokens(to_tokens(target.float(), m.cfg.patch_size))  # (B, S_local, C_out * patch)
        valid = self._local_tokens(torch.ones(self._valid, dtype=torch.bool, device=x.device))  # pads: False
        err = (pred.float() - tgt).pow(2) * valid[None, :, None]
        if weight is not None:
            err = err * weight.float().view(-1, 1, 1)
        return err.sum(), int(valid.sum())

    def forward(self, prep: dict) -> LossOut:
        m = self.inner
        lat, target = prep["latents"], prep["target"]
        m.check_input(lat, prep.get("image_context"))
        B = lat.shape[0]
        grid = tuple(n // p for n, p in zip(lat.shape[2:], m.cfg.patch_size))
        timestep = torch.as_tensor(prep["timestep"], device=lat.device).reshape(-1).expand(B)

        x = m.patchify(lat)  # (B, S, D), replicated
        temb, e = m.embed_time(timestep)
        ctx = m.embed_text(prep["text_context"])
        clip = prep.get("image_context")
        ctx_img = m.image_embed(clip.to(m.dtype)) if clip is not None else None
        rope = self.local_rope(grid, lat.device, x.dtype)
        x, e, temb = self.enter(x, e, temb)  # cut over cp (attention pieces), then over tp (SP pieces)
        for block in m.blocks:
            x = block(x, e, ctx, ctx_img, rope)
        loss, n_valid = self.head_loss(x, temb, target, prep.get("weight"))
        per_token = m.cfg.out_channels * math.prod(m.cfg.patch_size)
        return LossOut(loss, n_valid * B * per_token, B, n_valid * B)
