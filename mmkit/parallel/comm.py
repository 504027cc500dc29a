"""Differentiable sequence split / gather over a process group (for sequence and context parallelism).

`split_seq` keeps this rank's contiguous piece of a dimension. Its backward is chosen by what the
caller needs upstream:
- "local": the gradient of the other pieces is zero here (their ranks hold it). Everything upstream then
  holds a *partial* gradient, summed over the group later (FSDP's reduce-scatter, or an all-reduce).
- "gather": the pieces' gradients are all-gathered, so upstream holds the *complete* gradient.
`gather_seq` is the inverse: all-gather forward; backward keeps this rank's piece of the gradient
(correct when everything downstream is computed identically on every rank of the group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, backward):
        n, r = dist.get_world_size(group), dist.get_rank(group)
        ctx.dim, ctx.group, ctx.backward, ctx.n, ctx.r = dim, group, backward, n, r
        return x.chunk(n, dim=dim)[r].contiguous()

    @staticmethod
    def backward(ctx, g):
        if ctx.backward == "gather":
            return _all_gather(g, ctx.dim, ctx.group), None, None, None
        parts = [torch.zeros_like(g) for _ in range(ctx.n)]
        parts[ctx.r] = g
        return torch.cat(parts, dim=ctx.dim), None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, backward):
        ctx.dim, ctx.group, ctx.backward = dim, group, backward
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        if ctx.backward == "reduce_scatter":  # every rank's gradient is partial: sum, keep this piece
            g = g.contiguous()
            dist.all_reduce(g, group=ctx.group)
        return g.chunk(n, dim=ctx.dim)[r].contiguous(), None, None, None


def split_seq(x: torch.Tensor, dim: int, group, backward: str = "local") -> torch.Tensor:
    """This rank's piece of `x` along `dim` (the size must divide by the group size).

    Example: `x_local = split_seq(x, 1, cp_group)  # (B, S, D) -> (B, S / cp, D)`.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    if x.shape[dim] % dist.get_world_size(group):
        raise ValueError(f"split_seq: size {x.shape[dim]} of dim {dim} does not divide by the group size")
    return _Split.apply(x, dim, group, backward)


def gather_seq(x: torch.Tensor, dim: int, group, backward: str = "slice") -> torch.Tensor:
    """All pieces of `x` along `dim`, in rank order. The backward keeps this rank's piece of the
    gradient ("slice": the gradient is the same on every rank) or sums the ranks' gradients first
    ("reduce_scatter": each rank's is partial, e.g. computed from its vocabulary shard).
    Example: `x = gather_seq(x_local, 1, cp_group)`.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _Gather.apply(x, dim, group, backward)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the backward sums the gradients too (every rank's output used the sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce (sum). Example: `ss = all_reduce_sum(local_sum_of_squares, tp_group)`."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (Megatron's "copy to region")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """`x` unchanged; its gradient becomes the sum over the group. Use it where a tensor computed
    identically on every rank feeds rank-local work (e.g. the timestep embedding feeding sequence-parallel
    tokens), so that everything upstream receives the complete gradient.
    Example: `e = copy_to_group(e, tp_group)`.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (the result is used identically on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of the ranks' partial `x`, where every rank then uses the sum the same way (a vocabulary-
    parallel embedding's output): the gradient passes through unchanged.
    Example: `embeds = reduce_from_group(local_rows, tp_group)`.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _ReduceFromGroup.apply(x, group)


def local_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a DTensor (FSDP2 / TP parameters and gradients; autograd passes gradients
    through to the DTensor), or `t` itself. Example: `dist.all_reduce(local_tensor(p.grad), group=g)`."""
    return t.to_local() if hasattr(t, "to_local") else t
