"""Parallel plans: how each model family is tensor-, sequence-, context- and data-parallelised.

`parallelize(task, dims, mesh, cfg)` applies, in order, TP/SP -> CP -> activation checkpointing ->
compile -> FSDP2 to the task's model (from outside: the model code stays single-device) and returns the plan.
Its `module` is what the trainer calls: `plan.module(prep)` returns the micro-batch's `LossOut`, where
`prep` is the task's `prepare(batch, generator)` output.

Gradient bookkeeping (what `finalize_grads` and the trainer rely on):
- the sequence is cut over cp ranks with a "local" backward: every parameter's gradient is partial
  over cp and FSDP2 sums it over `dp_shard_cp` (its divide factor is set to 1: the trainer divides by
  the global token count once);
- with sequence parallelism, tensors enter the sequence-sharded region through ops whose backward
  all-reduces over tp, so parameters upstream get complete gradients; the replicated parameters used
  on sequence-sharded tokens (norms, modulation, head) get partial ones, summed by `finalize_grads`;
- the loss, its count and the token count are partial over cp (and tp with SP): `reduce_stats` sums them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmkit import registry
from mmkit.common import clean_name
from mmkit.parallel.comm import copy_to_group, gather_seq, local_tensor, split_seq
from mmkit.parallel.dims import ParallelDims, padded_len


class SequenceShards:
    """How a video DiT's token sequence is padded and cut into this rank's piece, shared by the families'
    sharded forwards (training plans and the inference wrapper).

    A class using it sets `seq_shards` (pieces the sequence is cut into), `cp_group`, `tp_group` and `sp`
    (tensor parallel with sequence parallelism; None / False where absent); a family whose attention
    needs a coarser padding (Skiparse groups) overrides `padded`. `head_predict` ends an inference forward.
    Example: `cos, sin = self.rope_rows(cos, sin); x, e, temb = self.enter(x, e, temb)`.
    """

    _valid = 0  # the true token count S of the current forward (keys past it are padding)

    def padded(self, S: int) -> int:
        """S_pad: the token count after padding, a multiple of the sequence shards."""
        return padded_len(S, self.seq_shards)

    def rope_rows(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This cp rank's (cos, sin) rows (S_pad / cp, Dh) of the full (S, Dh) tables; remembers S."""
        S = cos.shape[0]
        pad = self.padded(S) - S
        if pad:  # padded rows: the identity rotation (their keys are masked, their outputs dropped)
            cos, sin = F.pad(cos, (0, 0, 0, pad), value=1.0), F.pad(sin, (0, 0, 0, pad))
        self._valid = S
        return split_seq(cos, 0, self.cp_group), split_seq(sin, 0, self.cp_group)

    def _local_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """A (B, S, ...) tensor (or (S,)) padded to S_pad and cut to this rank's tokens (cp, then tp with SP)."""
        dim = 1 if t.ndim > 1 else 0
        pad = self.padded(t.shape[dim]) - t.shape[dim]
        if pad:
            t = F.pad(t, (0, 0, 0, pad)) if dim == 1 else F.pad(t, (0, pad))
        t = split_seq(t, dim, self.cp_group)
        return split_seq(t, dim, self.tp_group) if self.sp else t

    def enter(self, x: torch.Tensor, e: torch.Tensor, temb: torch.Tensor):
        """Patch tokens (B, S, D), replicated, -> this rank's piece (padded tokens are zeros); the time
        embeddings e / temb made ready for rank-local tokens."""
        pad = self.padded(x.shape[1]) - x.shape[1]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = split_seq(x, 1, self.cp_group, backward="local")
        if self.sp:
            x = split_seq(x, 1, self.tp_group, backward="gather")
            # computed identically on every tp rank, used on this rank's tokens: complete gradients upstream
            e, temb = copy_to_group(e, self.tp_group), copy_to_group(temb, self.tp_group)
        return x, e, temb

    def head_predict(self, x: torch.Tensor, temb: torch.Tensor, grid) -> torch.Tensor:
        """Head on this rank's tokens, all-gathered over the sequence pieces (tp with SP, then cp: the
        order `enter` cut them in), padding dropped, unpatchified: the whole prediction
        (B, C_out, T, H, W) in fp32 on every rank of the sequence group. The model gives `head_tokens`
        and `unpatchify`.
        Example: `x, _, temb, grid = plan.trunk(lat, t, ctx); v = plan.head_predict(x, temb, grid)`.
        """
        m = self.inner
        y = m.head_tokens(x, temb)  # (B, S_pad / seq_shards, C_out * patch)
        if self.sp:
            y = gather_seq(y, 1, self.tp_group)
        y = gather_seq(y, 1, self.cp_group)[:, : self._valid]  # rank j of the group holds piece j
        return m.unpatchify(y, grid).float()


class ParallelPlan(nn.Module):
    """Base: holds the groups; families implement `apply_tp` and `forward(prep)` (context parallelism
    needs no set-up: the family's attention kernel reaches `cp_attn` per forward).

    It is an nn.Module wrapping the model (`self.inner`, not part of checkpoints: the trainer saves
    `task.model`) so that FSDP2's root hooks run around the whole family-specific forward.
    """

    loss_split_over_tp = False  # True: each tp rank's loss covers its own tokens even without SP

    def __init__(self, task, dims: ParallelDims, mesh, cfg):
        super().__init__()
        self.task, self.dims, self.mesh, self.cfg = task, dims, mesh, cfg
        self.inner = task.model
        self.spec = registry.get(cfg.model.family)  # the family's declarations (tp_rules, ...)
        self.tp_mesh = mesh["tp"] if dims.tp > 1 else None
        self.tp_group = self.tp_mesh.get_group() if dims.tp > 1 else None
        self.sp = dims.tp > 1 and dims.sequence_parallel
        self.cp_group = mesh["cp"].get_group() if dims.cp > 1 else None
        self.cp_attn = None
        if dims.cp > 1:
            from mmkit.parallel.sequence import ContextParallel

            uly = mesh["cp_ulysses"].get_group() if dims.ulysses > 1 else None
            ring = mesh["cp_ring"].get_group() if dims.cp // dims.ulysses > 1 else None
            self.cp_attn = ContextParallel(uly, ring, dims.ring_window)
        self._tp_partial_names: list[str] = []  # replicated params used on sequence-sharded tokens

    # ---- set-up ------------------------------------------------------------------------------
    def apply(self, fsdp: bool = True) -> ParallelPlan:
        """TP/SP -> CP -> activation checkpointing -> compile -> FSDP2 (unless `fsdp` is False), in place
        on `task.model`."""
        from mmkit.parallel.ac import apply_ac
        from mmkit.parallel.compile import apply_compile

        if self.dims.tp > 1:
            self.apply_tp()
            self.record_tp_partial()
        m = self.cfg.model
        apply_ac(self.inner, m.activation_checkpointing, m.ac_every_k)
        apply_compile(self.inner, m.compile)
        if fsdp and self.dims.fsdp:
            self.apply_fsdp()
        return self

    def sp_partial_names(self) -> list[str]:
        """Names of replicated parameters used on sequence-sharded tokens (family-specific)."""
        return []

    def record_tp_partial(self) -> None:
        """Remember the replicated parameters whose gradients are partial over tp (after TP, before FSDP:
        DTensor-sharded parameters are complete and excluded)."""
        if not self.sp:
            return
        prefixes = tuple(self.sp_partial_names())
        self._tp_partial_names = [
            n
            for n, p in self.inner.named_parameters()
            if n.startswith(prefixes) and not hasattr(p, "device_mesh") and p.requires_grad
        ]

    def fsdp_units(self) -> list[nn.Module]:
        """Modules that get their own FSDP2 unit (the repeated blocks the model names, `_repeated_blocks`)."""
        from mmkit.parallel.ac import block_lists

        return [b for blocks in block_lists(self.inner) for b in blocks]

    def apply_fsdp(self) -> None:
        from torch.distributed.fsdp import fully_shard

        d = self.dims
        mesh = self.mesh["dp_replicate", "dp_shard_cp"] if d.dp_replicate > 1 else self.mesh["dp_shard_cp"]
        for unit in self.fsdp_units():
            fully_shard(unit, mesh=mesh, reshard_after_forward=True)
        fully_shard(self, mesh=mesh, reshard_after_forward=True)
        for mod in self.modules():
            if hasattr(mod, "set_gradient_divide_factor"):
                mod.set_gradient_divide_factor(1.0)  # sum: the trainer divides by the global count
                mod.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)

    def apply_tp(self) -> None:
        raise NotImplementedError

    # ---- per step ----------------------------------------------------------------------------
    @torch.no_grad()
    def finalize_grads(self) -> None:
        """Sum the partial gradients of replicated sequence-parallel parameters over tp."""
        if not self.sp:
            return
        # names as recorded before activation checkpointing / compile wrapped the blocks
        params = {clean_name(n): p for n, p in self.inner.named_parameters()}
        grads = []
        for n in self._tp_partial_names:
            g = params[n].grad
            if g is not None:
                grads.append(local_tensor(g))
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.tp_group)
            off = 0
            for g in grads:
                g.copy_(flat[off : off + g.numel()].view_as(g))
                off += g.numel()

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum per-micro-batch statistics that are partial over the sequence shards (cp, tp with SP)."""
        if self.cp_group is not None:
            dist.all_reduce(stats, group=self.cp_group)
        if self.sp or (self.loss_split_over_tp and self.tp_group is not None):
            dist.all_reduce(stats, group=self.tp_group)
        return stats


def parallelize(task, dims: ParallelDims, mesh, cfg, fsdp: bool = True) -> ParallelPlan:
    """The family's plan, applied. Example: `plan = parallelize(task, dims, mesh, cfg); out = plan(prep)`.

    `fsdp=False` (pipeline parallelism): everything but FSDP2, which the trainer then applies per stage;
    the family's stages (`plans/<family>_stages.py`) call the plan's pieces (`enter`, `local_rope` /
    `row_meta`, `head_loss`)."""
    cls = registry.get(cfg.model.family).resolve("plan")
    return cls(task, dims, mesh, cfg).apply(fsdp=fsdp)
