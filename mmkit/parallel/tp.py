"""Tensor-parallel building blocks (DTensor), applied by `parallel/plans/<family>.py`.

Linear layers are sharded with DTensor's `ColwiseParallel` (output features split: whole heads or
MLP columns per rank) and `RowwiseParallel` (input features split; the partial outputs are summed,
with sequence parallelism reduce-scattered over the sequence instead). `PrepareModuleInput` all-gathers
the sequence-sharded activations in front of attention and MLP. Parameters stay DTensors, so
distributed checkpoints see global shapes and reshard into any other layout.

What DTensor has no style for lives here: `HeadShardedRMSNorm`, Wan's RMSNorm over *all* heads of q
or k, whose weight and input are split by heads; it sums the squares over the tensor-parallel group.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from mmkit.parallel.comm import all_reduce_sum


class HeadShardedRMSNorm(nn.Module):
    """RMSNorm over the full width D whose input (..., D / tp) and weight are this rank's heads.

    Equal to `nn.RMSNorm(D)` on the gathered tensor: the sum of squares is all-reduced over the
    group before the scale. Example: `attn.norm_q = HeadShardedRMSNorm(attn.norm_q, tp_mesh)`.
    """

    def __init__(self, norm: nn.RMSNorm, tp_mesh):
        super().__init__()
        self.dim = norm.normalized_shape[0]
        self.eps = norm.eps
        self.group = tp_mesh.get_group()
        self.weight = nn.Parameter(distribute_tensor(norm.weight.data, tp_mesh, [Shard(0)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        ss = all_reduce_sum(x.float().square().sum(-1, keepdim=True), self.group)  # (..., 1) over all heads
        y = x.float() * torch.rsqrt(ss / self.dim + eps)
        return (y * self.weight.to_local().float()).to(x.dtype)


def shard_linears(module: nn.Module, tp_mesh, colwise: list[str], rowwise: list[str], sp: bool) -> None:
    """Colwise/rowwise-shard the named Linear children of `module` (missing names are skipped).

    With sequence parallelism (`sp`) the row-wise outputs are reduce-scattered over dim 1 (the sequence),
    otherwise all-reduced. Example: `shard_linears(block.mlp, mesh["tp"], ["fc1"], ["fc2"], sp=True)`.
    """
    plan = {}
    for name in colwise:
        if hasattr(module, name):
            plan[name] = ColwiseParallel()
    for name in rowwise:
        if hasattr(module, name):
            plan[name] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
    parallelize_module(module, tp_mesh, plan)


def gather_inputs(module: nn.Module, tp_mesh, n_args: int, sp: bool) -> None:
    """Make `module`'s first positional input whole before it runs: with sequence parallelism it arrives
    sequence-sharded (Shard(1)) and is all-gathered; otherwise it is already replicated. The other
    `n_args - 1` positional inputs pass through untouched. Example: `gather_inputs(block.attn, mesh["tp"], 2, True)`.
    """
    first = Shard(1) if sp else Replicate()
    rest = (None,) * (n_args - 1)
    parallelize_module(
        module,
        tp_mesh,
        PrepareModuleInput(input_layouts=(first, *rest), desired_input_layouts=(Replicate(), *rest)),
    )
