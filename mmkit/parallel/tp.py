"""Tensor-parallel building blocks (DTensor), applied by `parallel/plans/<family>.py`.

Linear layers are sharded with DTensor's `ColwiseParallel` (output features split: whole heads or
MLP columns per rank) and `RowwiseParallel` (input features split; the partial outputs are summed,
with sequence parallelism reduce-scattered over the sequence instead). `PrepareModuleInput` all-gathers
the sequence-sharded activations in front of attention and MLP. Parameters stay DTensors, so
distributed checkpoints see global shapes and reshard into any other layout.

What DTensor has no style for lives here: `HeadShardedRMSNorm`, Wan's RMSNorm over *all* heads of q
or k, whose weight and input are split by heads; it sums the squares over the tensor-parallel group;
`VocabParallelEmbedding` and `vocab_parallel_cross_entropy`, the LLM's embedding table and LM head
split over vocabulary rows (a 152k x 8192 table is 5 GB in fp32).
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

from mmkit.parallel.comm import all_reduce_sum, reduce_from_group


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
        xf = x.float()  # one fp32 copy, kept once for backward (with the normalized tensor: 8 B per element)
        ss = all_reduce_sum(xf.square().sum(-1, keepdim=True), self.group)  # (..., 1) over all heads
        y = xf * torch.rsqrt(ss / self.dim + eps)
        return (y * self.weight.to_local().float()).to(x.dtype)


def apply_tp_rules(model: nn.Module, rules, tp_mesh, sp: bool) -> dict[str, list[str]]:
    """Shard the modules a family's `tp_rules` (`FamilySpec`, `mmkit/registry.py`) name, in place.

    colwise / rowwise Linears get DTensor's `ColwiseParallel` / `RowwiseParallel` (row-wise outputs
    reduce-scattered over the sequence with `sp`, else all-reduced); a head_norm RMSNorm becomes a
    `HeadShardedRMSNorm`. The same rules give the converter its per-tensor split, so a converted shard is
    what the rank's DTensor holds. "vocab" modules (embedding table, LM head) need the family's own
    modules: they are returned, not touched. Returns {style: [module paths]}.
    Example: `apply_tp_rules(model, registry.get("wan").tp_rules, mesh["tp"], sp=True)`.
    """
    found: dict[str, list[str]] = {}
    children: dict[str, dict[str, str]] = {}  # parent path -> {child name: style}
    for path, _ in model.named_modules():
        rule = next((r for r in rules if r.matches(path)), None)
        if rule is not None:
            found.setdefault(rule.style, []).append(path)
            parent, _, child = path.rpartition(".")
            children.setdefault(parent, {})[child] = rule.style
    for parent_path, styles in children.items():
        parent = model.get_submodule(parent_path)
        plan = {}
        for child, style in styles.items():
            if style == "colwise":
                plan[child] = ColwiseParallel()
            elif style == "rowwise":
                plan[child] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
            elif style == "head_norm":
                setattr(parent, child, HeadShardedRMSNorm(getattr(parent, child), tp_mesh))
        if plan:
            parallelize_module(parent, tp_mesh, plan)
    return found


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


def vocab_shard(n: int, group) -> tuple[int, int]:
    """(first row, rows) of this rank's piece of `n` vocabulary rows under DTensor's Shard(0) (chunks
    of ceil(n / size), the last ones smaller). Example: `vocab_shard(406, tp_group)` -> `(0, 203)`."""
    import torch.distributed as dist

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    c = -(-n // size)
    start = min(rank * c, n)
    return start, max(min(n, start + c) - start, 0)


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding whose rows (vocabulary) are split over the tensor-parallel group; each rank looks up
    the ids it holds and the partial rows are summed (identity backward: the result is used identically
    on every rank). Keeps the parameter name `weight` (a Shard(0) DTensor).
    Example: `lang.embed_tokens = VocabParallelEmbedding(lang.embed_tokens.weight, tp_mesh)`.
    """

    def __init__(self, weight: torch.Tensor, tp_mesh):
        super().__init__()
        self.group = tp_mesh.get_group()
        if hasattr(weight, "device_mesh"):
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        else:
            self.weight = nn.Parameter(distribute_tensor(weight.data, tp_mesh, [Shard(0)]))
        self.num_embeddings = self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        start, n = vocab_shard(self.num_embeddings, self.group)
        local = self.weight.to_local()  # (n, D)
        mine = (ids >= start) & (ids < start + n)
        rows = torch.nn.functional.embedding((ids - start).clamp(0, max(n - 1, 0)), local)
        return reduce_from_group(rows * mine.unsqueeze(-1).to(rows.dtype), self.group)


class VocabParallelHead(nn.Module):
    """The LM head over this rank's vocabulary rows: h (..., D) -> local logits (..., V / tp), to be
    combined by `vocab_parallel_cross_entropy`. `weight` is a Shard(0) DTensor parameter (the embedding's
    own with tied embeddings). A module (not a bare matmul) so FSDP2 can make it a unit of its own.
    Example: `lang.lm_head = VocabParallelHead(nn.Parameter(distribute_tensor(w, tp_mesh, [Shard(0)])))`.
    """

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h, self.weight.to_local())


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group, vocab: int
) -> torch.Tensor:
    """Per-token cross-entropy (K,) from this rank's vocabulary columns of the logits (K, V / tp): the
    max, the sum of exponentials and the target logit are combined over the group, so no rank ever holds
    the full (K, V) logits. Equal to `F.cross_entropy(full_logits, target, reduction="none")`.
    Example: `ce = vocab_parallel_cross_entropy(h @ w_local.T, labels, tp_group, vocab=152064)`.
    """
    import torch.distributed as dist

    start, n = vocab_shard(vocab, group)
    logits = logits.float()
    m = logits.detach().max(dim=-1).values if n else logits.new_full(logits.shape[:1], -float("inf"))
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)  # stabiliser (no gradient needed)
    shifted = logits - m[:, None]
    sumexp = all_reduce_sum(shifted.exp().sum(-1), group)
    mine = (target >= start) & (target < start + n)
    t = shifted.gather(1, (target - start).clamp(0, max(n - 1, 0))[:, None])[:, 0] * mine
    return sumexp.log() - all_reduce_sum(t, group)
