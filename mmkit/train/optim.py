"""AdamW over the trainable parameters, with weight decay only where it belongs.

What this provides (and what the trainer chooses):
- `build_optimizer(model, cfg.optim)`: `torch.optim.AdamW` with two parameter groups, "decay" and
  "no_decay". No decay on biases, norm weights, any parameter with fewer than 2 dimensions, positional
  tables (`pos_embed`, `position_embedding`) and the AdaLN modulation tables of DiTs (`modulation`,
  `scale_shift_table`: per-channel shift/scale offsets, biases in all but shape). Frozen parameters
  (`requires_grad=False`) are left out.
- fp32 master weights: the trainable parameters must be float32 and stay float32; the optimizer
  updates them in fp32. bf16 compute is the trainer's `torch.autocast(device, torch.bfloat16)` around
  forward + loss (or, with FSDP2 in mmkit/parallel, a MixedPrecisionPolicy with param_dtype=bf16,
  reduce_dtype=fp32, which also keeps the sharded fp32 parameters as the master copy). A bf16
  trainable parameter would make every update round to 8 bits of mantissa, so it is refused here.
- fused AdamW (one kernel, no per-parameter temporaries) for plain CPU/CUDA tensors; distributed
  (DTensor) parameters get torch's default implementation.
- `clip_grad_norm_`: the global gradient norm as a Python float, DTensor-aware (FSDP2/TP shards).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Name fragments of parameters that get no weight decay regardless of shape.
NO_DECAY_NAME_PATTERNS = (
    "pos_embed",
    "position_embedding",
    "pos_embedding",
    "modulation",
    "scale_shift_table",
)
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    # Model code defines its own RMSNorm classes; their names say what they are.
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_patterns: Iterable[str] = NO_DECAY_NAME_PATTERNS
) -> list[dict]:
    """Trainable parameters split into `[{"params", "weight_decay", "names"}, ...]` (decay, then no_decay).

    Empty groups are dropped. `names` lists each group's parameter names (for tests and logs; pop it
    before handing the groups to an optimizer, which `build_optimizer` does).
    Example: `[g["names"] for g in param_groups(model, 0.01)]`.
    """
    patterns = tuple(no_decay_patterns)
    decay, no_decay = ([], []), ([], [])
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:  # tied weights appear once
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            skip = p.ndim < 2 or _is_norm(module) or any(pat in name for pat in patterns)
            target = no_decay if skip else decay
            target[0].append(p)
            target[1].append(name)
    groups = [
        {"params": ps, "weight_decay": wd, "names": names}
        for (ps, names), wd in ((decay, weight_decay), (no_decay, 0.0))
        if ps
    ]
    return groups


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters from an `OptimConfig` (lr, betas, eps, weight_decay).

    Raises ValueError when nothing is trainable or a trainable parameter is not float32 (fp32 master
    weights are required; bf16 compute comes from autocast).
    Example: `opt = build_optimizer(model, cfg.optim)`.
    """
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError(
            "optimizer: the model has no trainable parameters; check model.freeze_vision/freeze_merger/freeze_llm"
        )
    for g in groups:
        for p, name in zip(g["params"], g["names"]):
            if p.dtype != torch.float32:
                raise ValueError(
                    f"optimizer: trainable parameter {name!r} is {p.dtype}; trainable weights must be float32 "
                    "(fp32 master weights). Keep the model in fp32 and set train.mixed_precision=bf16 for bf16 compute"
                )
        del g["names"]
    # torch's fused AdamW updates each dtype/device group in one kernel with no temporaries. Its default
    # elsewhere allocates them: on CPU two per parameter (sqrt(v), then sqrt(v) / bias correction; 2 x 1.2 GB
    # for a 151936 x 2048 embedding, the step's memory peak), on CUDA foreach temporaries the size of all
    # parameters. Plain tensors on CPU/CUDA only: distributed tensors of different meshes cannot share one
    # fused call, and other backends may lack the kernel. Same update, float rounding aside.
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p) in (torch.Tensor, nn.Parameter) and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, extra_group=None, norm_params=None
) -> float:
    """Global L2 norm of the gradients (before clipping) as a float; clips in place when max_norm > 0.

    Plain tensors and DTensors on any mix of meshes (FSDP2 shards, TP shards, both): squared norms of the
    local shards are summed per (mesh, placements) and all-reduced over the mesh dimensions they are
    sharded on (replicated dimensions hold copies and are counted once). `extra_group` adds one more sum
    (pipeline stages hold disjoint parameters); `norm_params` (default: all) are the ones counted in the
    norm (a tied weight held by two stages is counted once, clipped on both). Clipping multiplies by min(1, max_norm / (norm + 1e-6)),
    as `torch.nn.utils.clip_grad_norm_` does.
    Example: `grad_norm = clip_grad_norm_(model.parameters(), cfg.train.grad_clip)`.
    """
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    counted = grads if norm_params is None else [p.grad for p in norm_params if p.grad is not None]
    by_spec: dict = {}
    for g in counted:
        key = (g.device_mesh, tuple(g.placements)) if hasattr(g, "device_mesh") else None
        by_spec.setdefault(key, []).append(g.to_local() if key is not None else g)
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for key, local in by_spec.items():
        sq = torch.stack(torch._foreach_norm(local, 2.0)).float().square().sum() if local else total * 0
        if key is not None:
            mesh, placements = key
            for dim, pl in enumerate(placements):
                sharded = pl.is_shard() or type(pl).__name__ == "_StridedShard"  # FSDP2 over TP shards
                if sharded and mesh.size(dim) > 1:
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total += sq
    if extra_group is not None:
        dist.all_reduce(total, group=extra_group)
    norm = total.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype) if not hasattr(g, "device_mesh") else float(coef))
    return float(norm)
