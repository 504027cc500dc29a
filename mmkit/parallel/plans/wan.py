"""Wan2.1 DiT: tensor + sequence parallel, context parallel (Ulysses / ring / hybrid), FSDP2.

Forward under a plan (`WanPlan.forward(prep)`), with S video tokens cut into `seq_shards` pieces, composed
of the model's own stages (`embed`, `blocks`, `head_tokens`):
  patchify, time/text/image embeddings (replicated)
  -> pad S to a multiple of cp x tp(SP), cut over cp ("local" backward), then over tp (SP)
  -> blocks: self-attention all-gathers the tp pieces (heads split over tp), runs context-parallel
     attention over cp (padding masked), reduce-scatters back; cross-attention and the MLP likewise
  -> head on this rank's tokens -> the task's squared error against this rank's piece of the target,
     padding dropped (`head_loss`); or, for inference, the predicted tokens all-gathered over the sequence
     pieces, padding dropped, unpatchified (`head_predict`).
The steps up to the head (`WanShardedForward.trunk`) are the only sharded Wan forward: inference
(`infer/wan_parallel.py`) runs them with its sequence group as the cp group and no tp.
TP shards (DTensor): q/k/v/out of both attentions, the image K/V, the MLP (column-wise in, row-wise out),
and Wan's q/k RMSNorm over all heads (`HeadShardedRMSNorm`). Replicated: embeddings, modulation,
cross-attention LayerNorm, head. Selective AC's lean block path runs on the local shards through the
hooks `WanLeanTP` installs (the model itself never sees a mesh). Pipeline stages: `plans/wan_stages.py`.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from mmkit.common import LossOut
from mmkit.models.common.attention import attention
from mmkit.parallel.comm import copy_to_group, local_tensor
from mmkit.parallel.plans import ParallelPlan, SequenceShards
from mmkit.parallel.tp import apply_tp_rules, gather_inputs


def to_tokens(video: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, S, pt*ph*pw*C): the token layout the DiT head predicts (unpatchify's inverse)."""
    B, C, T, H, W = video.shape
    pt, ph, pw = patch
    x = video.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, (T // pt) * (H // ph) * (W // pw), -1)


class WanLeanTP:
    """The hooks a Wan attention / MLP module's lean path (`recompute_hidden`) calls under tensor
    parallelism (`module.lean_tp`): plain local shards in, row-parallel outputs combined over tp.

    Example: `block.mlp.lean_tp = WanLeanTP(mesh["tp"], sp=True)`.
    """

    def __init__(self, tp_mesh, sp: bool):
        self.mesh, self.sp, self.group = tp_mesh, sp, tp_mesh.get_group()

    def weights(self, *mods) -> list[torch.Tensor]:
        """weight, bias, ... of column-parallel Linears: this rank's shards (whole heads / MLP columns)."""
        return [local_tensor(t) for m in mods for t in (m.weight, m.bias)]

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The module input gathered over tp (a replicated DTensor) as a plain tensor. The lean functions
        use only this rank's heads / MLP columns, so its gradient is partial over tp (summed by DTensor on
        the way back: reduce-scattered to the sequence-parallel pieces)."""
        return x.to_local(grad_placements=[Partial()]) if isinstance(x, DTensor) else x

    def row_linear(self, fn, args: tuple, linear) -> torch.Tensor:
        """`fn(*args, w, b)` ending in row-parallel `linear`: fn runs on the local weight shard without the
        bias, the partial sums are reduce-scattered over the sequence (SP) or all-reduced, then the bias is
        added (as DTensor's RowwiseParallel does)."""
        y = fn(*args, linear.weight.to_local(), None)  # (B, S, D_out), partial over tp
        y = DTensor.from_local(y, self.mesh, [Partial()], run_check=False)
        y = y.redistribute(self.mesh, [Shard(1) if self.sp else Replicate()]).to_local()
        if linear.bias is not None:
            b = (
                linear.bias.to_local()
            )  # replicated; with SP used on this rank's tokens: gradient summed over tp
            y = y + (copy_to_group(b, self.group) if self.sp else b)
        return y

    def prologue(self, args: list[tuple]) -> list[tuple]:
        """Without SP the prologue norms' gradients come from this rank's heads / MLP columns only, but
        every rank must hold the complete ones (as without the lean path): summed over tp."""
        if self.sp:
            return args
        return [tuple(copy_to_group(t, self.group) for t in a) for a in args]


class WanShardedForward(SequenceShards):
    """The one sequence-sharded Wan forward, shared by training (`WanPlan`) and inference
    (`infer.wan_parallel.WanSequenceParallel`): `trunk` (embed -> local rope -> enter -> blocks), then
    `WanPlan.head_loss` (training) or `SequenceShards.head_predict` (inference).

    A class using it sets `inner` (the `WanTransformer`), `seq_shards` (pieces the sequence is cut into),
    `cp_group` / `cp_attn` (the context-parallel group and its `ContextParallel`, or None), `tp_group` and
    `sp` (tensor parallel with sequence parallelism; None / False for inference).
    Example: `x, _, temb, grid = self.trunk(lat, t, ctx); v = self.head_predict(x, temb, grid)`.
    """

    def _self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention over this rank's piece of the sequence; padded keys never attended."""
        if self.cp_attn is not None:
            return self.cp_attn.attention(q, k, v, valid_len=self._valid)
        n = self._valid
        return attention(q, k[:, :, :n], v[:, :, :n])

    # ---- the pieces of a sharded forward (also what pipeline stages call, `wan_stages.WanStage`) -----
    def local_rope(self, grid: tuple[int, int, int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This cp rank's (cos, sin) rows (S_pad / cp, Dh) for a latent grid in patches; every block's
        self-attention routed to `_self_attention` (keys past the true token count are padding)."""
        rows = self.rope_rows(*self.inner.rope(grid, device, dtype))  # (S, Dh) -> (S_pad / cp, Dh)
        for block in self.inner.blocks:
            getattr(block, "_checkpoint_wrapped_module", block).attn.attn_fn = self._self_attention
        return rows

    def trunk(self, latents, timestep, text_context, image_context=None):
        """Embeddings (replicated) -> this rank's tokens through all blocks.

        Returns (x (B, S_pad / seq_shards, D), e, temb, grid in patches).
        Example: `x, e, temb, grid = plan.trunk(lat, t, text_context)`.
        """
        m = self.inner
        m.check_input(latents, image_context)
        grid = m.grid(latents)
        x, temb, e, ctx, ctx_img = m.embed(latents, timestep, text_context, image_context)
        rope = self.local_rope(grid, latents.device, x.dtype)
        x, e, temb = self.enter(x, e, temb)  # cut over cp (attention pieces), then over tp (SP pieces)
        for block in m.blocks:
            x = block(x, e, ctx, ctx_img, rope)
        return x, e, temb, grid


class WanPlan(WanShardedForward, ParallelPlan):
    """Example: `plan = parallelize(task, dims, mesh, cfg); out = plan(task.prepare(batch, g))`."""

    @property
    def seq_shards(self) -> int:
        return self.dims.seq_shards

    def sp_partial_names(self) -> list[str]:
        return ["blocks.", "head."]

    def apply_tp(self) -> None:
        """The spec's tp_rules (q/k/v, fc1 colwise; out, fc2 rowwise; q/k norms over heads), then what the
        rules cannot say: local head counts, gathered inputs, and the lean path's reducers."""
        m, tp, sp = self.inner, self.tp_mesh, self.sp
        apply_tp_rules(m, self.spec.tp_rules, tp, sp)
        hooks = WanLeanTP(tp, sp)
        for block in m.blocks:
            block.attn.heads //= self.dims.tp
            block.cross.heads //= self.dims.tp
            gather_inputs(block.attn, tp, 2, sp)  # (x, rope)
            gather_inputs(block.cross, tp, 3, sp)  # (x, ctx, ctx_img)
            gather_inputs(block.mlp, tp, 1, sp)
            for mod in (block.attn, block.cross, block.mlp):  # selective AC's lean path on local shards
                mod.lean_tp = hooks

    def head_loss(
        self, x, temb, target: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """Head on this rank's tokens -> (summed squared error against its piece of `target`, real tokens).
        The error is the task's (`task.loss_fn`, `losses.mse_sum`) with the padding tokens masked out."""
        m = self.inner
        pred = m.head_tokens(x, temb)  # (B, S_local, C_out * patch)
        tgt = self._local_tokens(to_tokens(target.float(), m.cfg.patch_size))  # (B, S_local, C_out * patch)
        valid = self._local_tokens(torch.ones(self._valid, dtype=torch.bool, device=x.device))  # pads: False
        loss, _ = self.task.loss_fn(pred, tgt, valid, weight, channel_dim=-1)
        return loss, int(valid.sum())

    def forward(self, prep: dict) -> LossOut:
        m = self.inner
        lat = prep["latents"]
        x, _, temb, _ = self.trunk(lat, prep["timestep"], prep["text_context"], prep.get("image_context"))
        loss, n_valid = self.head_loss(x, temb, prep["target"], prep.get("weight"))
        B = lat.shape[0]
        per_token = m.cfg.out_channels * math.prod(m.cfg.patch_size)
        return LossOut(loss, n_valid * B * per_token, B, n_valid * B)
