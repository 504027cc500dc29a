"""OpenSoraPlan 1.3 DiT: tensor + sequence parallel, context parallel (Ulysses / ring / hybrid) with
Skiparse, FSDP2. Pipeline stages: `plans/opensoraplan_stages.py`.

Forward under a plan (`OpenSoraPlanPlan.forward(prep)`), composed of the model's own stages:
  patch / time / caption embeddings (replicated)
  -> pad the S video tokens to S_pad and cut over cp ("local" backward), then over tp (SP)
  -> blocks: every self-attention runs this plan's `core` (installed on each block):
     dense layers: `ContextParallel.attention` over cp (Ulysses, ring or hybrid; padding masked, and the
     padded latents of a batch of variable-size clips as a per-sample key mask);
     Skiparse layers: one all-to-all over the cp group hands each rank whole Skiparse groups (k/a of
     them, a = gcd(cp, k)) for H/b of the heads (b = cp/a; `skiparse_split`), attention runs locally on
     them, a second all-to-all hands the tokens back (docs/parallel.md);
     no cp: the padding is cut off and the single-device attention runs as is.
  -> head on this rank's tokens -> the task's squared error against this rank's piece of the target,
     masked over real latents (`video_mask`, element by element as on one device).
The steps up to the head (`OpenSoraPlanShardedForward.trunk`) are the only sharded OpenSoraPlan forward:
training runs them with the batch's `video_mask` (None when every latent is real); inference
(`infer/opensoraplan_parallel.py`) runs them with its sequence group as the cp group, no tp and no video
mask, then `head_predict`.
TP shards q/k/v/out of both attentions and the MLP (the spec's tp_rules); embeddings, modulation and
the head stay replicated.

Exactness of Skiparse under cp: S_pad is a multiple of k^2 x cp, so each rank's contiguous shard starts
on a k^2 boundary and regrouping the shard gives exactly its part of every global group (group
membership, i mod k or (i // k) mod k, does not change by multiples of k^2), in global order. Tokens
past S take q = k = v = 0 and the key bias -9980, as the single-device Skiparse padding does; extra
padded k^2 blocks add keys of weight exp(-9980) = 0.

Padded latents (`video_mask` zeros: clips of different sizes in one batch) keep the single-device
additive key bias (-10000) in Skiparse layers; dense layers under cp mask the same keys out (-inf), which
gives the same rows: exp(-10000 + O(10)) is exactly 0 in float32 (only keys are masked, so padded
queries see the real keys either way). Nothing real reads a padded token: its keys weigh 0 and the loss
masks it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmkit.common import LossOut
from mmkit.models.opensoraplan.model import (
    MASK_BIAS,
    SKIPARSE_PAD_BIAS,
    skiparse_attention,
    skiparse_regroup,
    skiparse_restore,
)
from mmkit.parallel.dims import padded_len
from mmkit.parallel.plans import ParallelPlan, SequenceShards
from mmkit.parallel.plans.wan import to_tokens
from mmkit.parallel.tp import apply_tp_rules, gather_inputs


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over `group` with equal chunks along dim 0 (its own inverse routing, so the
    backward is the same exchange of the gradient)."""

    @staticmethod
    def exchange(x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous()  # the collective reads and writes flat memory: both buffers row-major
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _AllToAll.exchange(x, group)

    @staticmethod
    def backward(ctx, g):
        return _AllToAll.exchange(g, ctx.group), None


def skiparse_split(cp: int, n: int) -> tuple[int, int]:
    """(a, b) with a x b = cp: a Skiparse layer's k = `n` groups are split a = gcd(cp, n) ways over the cp
    ranks and the heads b = cp / a ways (b must divide the local heads: `check_skiparse_shards`).

    Example: `skiparse_split(2, 4)` -> `(2, 1)`; `skiparse_split(3, 4)` -> `(1, 3)`; `skiparse_split(8, 4)`
    -> `(4, 2)`: each of 8 ranks attends one group with half the heads.
    """
    a = math.gcd(cp, n)
    return a, cp // a


def skiparse_context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    valid: int,
    mode: str,
    n: int,
    group,
) -> torch.Tensor:
    """Skiparse self-attention of this rank's contiguous shard (B, H, L, Dh) of a sequence of
    S_pad = cp x L tokens (L a multiple of n^2, `valid` real tokens), exact to the single-device result.

    With (a, b) = `skiparse_split(cp, n)` (b must divide H), one all-to-all gives rank r = i b + j the
    whole groups [i n/a, (i+1) n/a) for the heads [j H/b, (j+1) H/b); the attention of each group is
    local; a second all-to-all returns the outputs to the shards. `bias` (B, valid) or None, replicated.
    Example: `o = skiparse_context_parallel(q, k, v, None, 45, "single", 4, cp_group)`.
    """
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    B, H, L, D = q.shape
    a, b = skiparse_split(cp, n)
    g, h = n // a, H // b  # groups and heads per rank
    mine = r // b  # this rank's block of groups
    assert g * a == n and h * b == H, (cp, n, H)  # check_skiparse_shards refuses such a layout clearly
    start = r * L
    keep = (torch.arange(start, start + L, device=q.device) < valid).to(q.dtype)[:, None]  # (L, 1)
    q, k, v = (t * keep for t in (q, k, v))  # tokens past `valid`: zeros, as Skiparse pads

    # one exchange for q, k and v: (B, H, L, D) x 3 -> (cp, g, 3, B, h, L / n, D), chunk i b + j = rank
    # (i, j)'s groups and heads
    qkv = skiparse_regroup(torch.stack([q, k, v]).view(3 * B, H, L, D), mode, n)  # (n 3 B, H, L / n, D)
    qkv = (
        qkv.view(a, g, 3, B, b, h, L // n, D)
        .permute(0, 4, 1, 2, 3, 5, 6, 7)
        .reshape(cp, g, 3, B, h, L // n, D)
    )
    qkv = _AllToAll.apply(qkv, group)  # chunk s = shard s's part of my groups, in global token order
    qg, kg, vg = qkv.permute(2, 1, 3, 4, 0, 5, 6).reshape(3, g * B, h, cp * L // n, D).unbind(0)
    full = q.new_zeros(B, valid) if bias is None else bias.to(q.dtype)
    full = F.pad(full, (0, cp * L - valid), value=SKIPARSE_PAD_BIAS)  # (B, S_pad)
    mask = skiparse_regroup(full[:, None, :, None], mode, n)  # (n B, 1, S_pad / n, 1), group-major
    mask = mask[mine * g * B : (mine + 1) * g * B].transpose(2, 3)  # (g B, 1, 1, S_pad / n)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)  # (g B, h, S_pad / n, D)
    o = o.view(g, B, h, cp, L // n, D).permute(3, 0, 1, 2, 4, 5)  # (cp, g, B, h, L / n, D)
    o = _AllToAll.apply(o.contiguous(), group)  # chunk s = my shard's part of rank s's groups / heads
    o = o.view(a, b, g, B, h, L // n, D).permute(0, 2, 3, 1, 4, 5, 6)  # (a, g, B, b, h, L / n, D)
    return skiparse_restore(o.reshape(n * B, H, L // n, D), mode, n)


def check_skiparse_shards(cfg, cp: int, heads: int, what: str) -> None:
    """Raise ValueError unless `cp` sequence shards can share the Skiparse layers: cp = a x b with a
    dividing k (groups per rank) and b = cp / gcd(cp, k) dividing the `heads` each rank holds (after tp).

    `what` names the setting in the message (training: `parallel.cp=2`; inference: the flags).
    Example: `check_skiparse_shards(model.cfg, 8, 24, "parallel.cp=8")` (4 group blocks x 2 head blocks).
    """
    if cp <= 1 or not cfg.sparse1d:
        return
    a, b = skiparse_split(cp, cfg.sparse_n)
    if heads % b:
        top = min(cfg.sparse_n * heads, 32)
        ok = [d for d in range(2, top + 1) if heads % skiparse_split(d, cfg.sparse_n)[1] == 0]
        raise ValueError(
            f"{what}: a Skiparse layer splits its sparse_n={cfg.sparse_n} groups over {a} rank blocks and its "
            f"heads over {b}, and the {heads} heads (per tensor-parallel rank) do not divide by {b}; use a "
            f"degree in {ok}"
        )


class OpenSoraPlanShardedForward(SequenceShards):
    """The one sequence-sharded OpenSoraPlan forward, shared by training (`OpenSoraPlanPlan`, its pipeline
    stages) and inference (`infer.opensoraplan_parallel.OpenSoraPlanSequenceParallel`): `trunk` (embed ->
    local rope -> enter -> blocks), then `OpenSoraPlanPlan.head_loss` (training) or `head_predict`
    (inference).

    A class using it sets `inner` (the `OpenSoraPlanTransformer`), `seq_shards`, `cp_group` / `cp_attn`
    (the context-parallel group and its `ContextParallel`, or None), `tp_group` and `sp`.
    Example: `x, temb, grid = self.trunk(lat, t, caption, caption_mask); v = self.head_predict(x, temb, grid)`.
    """

    def padded(self, S: int) -> int:
        """S_pad: a multiple of the sequence shards and, under cp, of k^2 x cp (Skiparse shards)."""
        shards, cp = self.seq_shards, self._cp_size()
        if cp > 1 and self.inner.cfg.sparse1d:
            shards = math.lcm(shards, self.inner.cfg.sparse_n**2 * cp)
        return padded_len(S, shards)

    def _cp_size(self) -> int:
        return 1 if self.cp_group is None else dist.get_world_size(self.cp_group)

    def _core(self, mode: str | None, n: int, q, k, v, bias):
        """The self-attention of one block on this rank's shard (B, H_local, L, Dh)."""
        S = self._valid
        if self.cp_group is None:  # the whole padded sequence is here: drop the padding, run as one device
            o = skiparse_attention(q[:, :, :S], k[:, :, :S], v[:, :, :S], bias, mode, n)
            return F.pad(o, (0, 0, 0, q.shape[2] - S))
        if mode is None:
            key_mask = None if bias is None else bias > MASK_BIAS / 2  # (B, S), True = real latent
            return self.cp_attn.attention(q, k, v, valid_len=S, key_mask=key_mask)
        return skiparse_context_parallel(q, k, v, bias, S, mode, n, self.cp_group)

    def local_rope(self, grid: tuple[int, int, int], device, dtype):
        """This cp rank's (cos, sin) rows (S_pad / cp, Dh), and every block's attention routed to `_core`."""
        rows = self.rope_rows(*self.inner.rope(grid, device, dtype))  # (S, Dh) -> (S_pad / cp, Dh)
        for block in self.inner.blocks:
            attn = getattr(block, "_checkpoint_wrapped_module", block).attn
            attn.core = functools.partial(self._core, attn.skiparse, attn.sparse_n)
        return rows

    def trunk(self, latents, timestep, caption, caption_mask=None, video_mask=None):
        """Embeddings (replicated) -> this rank's tokens through all blocks. The caption mask becomes the
        cross-attention bias; `video_mask` (B, T, H, W) 0/1 (training's padded latents; None: every latent
        is real, as in inference) becomes the video key bias, replicated: Skiparse layers and the no-cp
        path add it, dense layers under cp pass it to `ContextParallel.attention(key_mask=)`.

        Returns (x (B, S_pad / seq_shards, D), temb (B, D), grid in patches).
        Example: `x, temb, grid = plan.trunk(lat, t, caption, caption_mask)`.
        """
        m = self.inner
        m.check_input(latents, caption)
        grid = m.grid(latents)
        x, temb, e, ctx = m.embed(latents, timestep, caption)
        vbias, tbias = m.biases(video_mask, caption_mask)  # (B, S) or None, (B, L) or None
        rope = self.local_rope(grid, latents.device, x.dtype)
        x, e, temb = self.enter(x, e, temb)  # cut over cp (attention pieces), then over tp (SP pieces)
        for block in m.blocks:
            x = block(x, e, ctx, rope, vbias, tbias)
        return x, temb, grid


class OpenSoraPlanPlan(OpenSoraPlanShardedForward, ParallelPlan):
    """Example: `plan = parallelize(task, dims, mesh, cfg); out = plan(task.prepare(batch, g))`."""

    @property
    def seq_shards(self) -> int:
        return self.dims.seq_shards

    def apply(self, fsdp: bool = True):
        """Refuse a cp degree the Skiparse layers cannot spread (before any compute), then apply."""
        heads = self.inner.cfg.num_attention_heads // self.dims.tp
        check_skiparse_shards(self.inner.cfg, self.dims.cp, heads, f"parallel.cp={self.dims.cp}")
        return super().apply(fsdp)

    def sp_partial_names(self) -> list[str]:
        return ["blocks.", "head."]

    def apply_tp(self) -> None:
        """The spec's tp_rules, local head counts and gathered inputs (SP)."""
        m, tp, sp = self.inner, self.tp_mesh, self.sp
        apply_tp_rules(m, self.spec.tp_rules, tp, sp)
        for block in m.blocks:
            block.attn.heads //= self.dims.tp
            block.cross.heads //= self.dims.tp
            gather_inputs(block.attn, tp, 3, sp)  # (x, rope, bias)
            gather_inputs(block.cross, tp, 3, sp)  # (x, ctx, bias)
            gather_inputs(block.mlp, tp, 1, sp)

    def head_loss(self, x, temb, target: torch.Tensor, weight: torch.Tensor | None, video_mask=None):
        """Head on this rank's tokens -> (summed squared error against its piece of `target` over real
        latents, the element count it covers). `video_mask` (B, T, H, W) 0/1 or None (all real)."""
        m = self.inner
        p = m.cfg.patch_size
        pred = m.head_tokens(x, temb)  # (B, S_local, p * p * C_out)
        tgt = self._local_tokens(to_tokens(target.float(), (1, p, p)))
        if video_mask is None:
            valid = self._local_tokens(torch.ones(self._valid, dtype=torch.bool, device=x.device))
            loss, _ = self.task.loss_fn(pred.float(), tgt, valid, weight, channel_dim=-1)
            return loss, int(valid.sum()) * pred.shape[0] * pred.shape[2]
        # the single-device criterion's mask, element by element in the token layout (B, S_local, P)
        full = video_mask.to(tgt.device, torch.float32)[:, None].expand(target.shape)
        valid = self._local_tokens(to_tokens(full, (1, p, p)))  # Skiparse/cp padding: zeros
        loss, count = self.task.loss_fn(pred.float(), tgt, valid, weight, channel_dim=-1)
        return loss, int(count)

    @staticmethod
    def real_mask(prep: dict) -> torch.Tensor | None:
        """The batch's `video_mask` (B, T, H, W), or None when it has no padded latent (the fast path)."""
        vm = prep.get("video_mask")
        return None if vm is None or bool(vm.bool().all()) else vm

    def forward(self, prep: dict) -> LossOut:
        lat = prep["latents"]
        vm = self.real_mask(prep)
        x, temb, _ = self.trunk(lat, prep["timestep"], prep["text_context"], prep.get("text_mask"), vm)
        loss, count = self.head_loss(x, temb, prep["target"], prep.get("weight"), vm)
        tokens = int(self._local_tokens(torch.ones(self._valid, dtype=torch.bool, device=x.device)).sum())
        return LossOut(loss, count, lat.shape[0], tokens * lat.shape[0])
