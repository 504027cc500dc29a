"""Pipeline parallelism: run a model's stages (`pp_stages.split_stages`) on the ranks of a pipeline
process group with a `torch.distributed.pipelining` schedule (GPipe, 1F1B, interleaved 1F1B).
Family-neutral: what a family's stages hold and exchange, how its micro-batches are checked and laid
out, and which weight its first and last stage share come from its stage class (the registry's
`stages`, e.g. `plans/wan_stages.py`).

`Pipeline.step(micro_batches)` runs forward and backward of every micro-batch; gradients land in the
stage parameters' `.grad`, SUMMED over micro-batches (never averaged), and the summed loss and its
count come back on every pipeline rank, so the trainer divides once, as on one device.

How micro-batches travel (identical list on every pipeline rank; validated on every rank before any
compute, so a bad batch raises the same error everywhere instead of hanging the others):
- the first stage gets the model inputs as positional arguments; every stage gets the per-micro-batch
  keywords (Wan: `grid`, `target`; Qwen: `position_ids`, `cu_seqlens`, `labels`, media), so metadata a
  later stage needs (RoPE grid, M-RoPE positions, packing boundaries) is read locally, never sent;
- only activations cross ranks, and the last stage turns its output into the summed loss itself
  (under a tensor / context-parallel plan, this rank's piece of the activations, and a loss partial
  over the sequence shards that the trainer sums; the count returned here is always complete);
- activations must have fixed shapes within a step (the stage class's `prepare`: Wan micro-batches
  must share their shapes, Qwen packed rows are padded to `seq_len`). A step whose shapes differ from
  the last one builds (and caches) a new schedule; building runs one extra forward/backward of
  micro-batch 0 to infer the buffer shapes.

Tied weights (the stage class's `tied_weight`, e.g. Qwen `tie_word_embeddings`): stage 0 and the last
stage each hold the matrix; after backward `sync_tied_grads` sums the two gradients across their ranks
(`step` calls it).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from mmkit import registry
from mmkit.parallel.comm import local_tensor
from mmkit.parallel.pp_stages import plan_layers, split_stages

__all__ = ["SCHEDULES", "Pipeline", "plan_layers", "split_stages"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
_SINGLE = ("gpipe", "1f1b")  # one stage per rank


def _stage_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss_fn: the last stage already returns the summed loss of its micro-batch."""
    return output


class Pipeline:
    """Runs this rank's stages with a pipelining schedule; one `step` = all micro-batches, fwd + bwd.

    `stages`: this rank's modules from `split_stages` (same pp_size and rank as `pp_group`).
    `schedule`: "gpipe" | "1f1b" (one stage per rank) | "interleaved_1f1b" (any number per rank).
    `seq_len` (packed rows, Qwen): fixed packed-row length every micro-batch is padded to; None = the step's
    longest row rounded up to a multiple of 64 (a new length rebuilds the schedule once).
    `tied_group`: the group of just the first- and last-stage ranks of this pipeline, for the tied-
    weight gradient sum; needed on those ranks when pp > 2 (with pp = 2 the pp group is that pair).
    Example:
        stages = split_stages(model, "wan", pp_size=2, pp_rank=pp_rank, pp_layers=None)
        pipe = Pipeline(stages, "wan", pp_group, "1f1b", n_microbatches=4, device=torch.device("cuda"))
        loss_sum, count = pipe.step(micro_batches)  # .grad: sums over the 4 micro-batches
        for p in pipe.parameters():                 # (after summing count over data parallelism)
            p.grad.div_(count)
    """

    def __init__(
        self,
        stages: list[nn.Module],
        family: str,
        pp_group: dist.ProcessGroup | None,
        schedule: str = "1f1b",
        n_microbatches: int = 1,
        device: torch.device | str = "cpu",
        seq_len: int | None = None,
        tied_group: dist.ProcessGroup | None = None,
        max_cached_shapes: int = 4,
    ):
        self.stage_cls = registry.get(family).resolve("stages")
        if schedule not in SCHEDULES:
            raise ValueError(f"parallel.pp_schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches={n_microbatches}: must be >= 1")
        if seq_len is not None and seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: a packed row needs at least 2 tokens")
        if not stages:
            raise ValueError("stages: empty; pass this rank's modules from split_stages")
        self.stages = sorted(stages, key=lambda s: s.stage_index)
        self.family, self.group, self.schedule_name = family, pp_group, schedule
        self.n_microbatches, self.device, self.seq_len = n_microbatches, torch.device(device), seq_len
        self.tied_group, self.max_cached_shapes = tied_group, max_cached_shapes
        self.model = self.stages[0].full_model
        self.num_stages = self.stages[0].num_stages
        pp_size, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
        expected = list(range(pp_rank, self.num_stages, pp_size))
        if [s.stage_index for s in self.stages] != expected:
            raise ValueError(
                f"stages {[s.stage_index for s in self.stages]} of {self.num_stages} do not belong to rank "
                f"{pp_rank} of a pipeline group of {pp_size} (expected stages {expected}); build them with "
                f"split_stages(model, family, pp_size={pp_size}, pp_rank={pp_rank}, ...)"
            )
        if schedule in _SINGLE and len(self.stages) != 1:
            raise ValueError(
                f"parallel.pp_schedule={schedule!r} runs one stage per rank, but this rank holds "
                f"{len(self.stages)} (virtual stages); use 'interleaved_1f1b' or flat parallel.pp_layers"
            )
        if schedule == "1f1b" and n_microbatches < self.num_stages:
            raise ValueError(
                f"parallel.pp_schedule='1f1b' needs at least as many micro-batches as stages: "
                f"n_microbatches={n_microbatches} < {self.num_stages} stages; raise the micro-batch count"
            )
        rounds = max(1, n_microbatches // pp_size)
        if schedule == "interleaved_1f1b" and n_microbatches % rounds:
            raise ValueError(
                f"parallel.pp_schedule='interleaved_1f1b': n_microbatches={n_microbatches} must be a multiple "
                f"of n_microbatches // pp = {rounds}; use a multiple of parallel.pp={pp_size}"
            )
        self.holds_last = self.stages[-1].is_last
        # Tied weight: one Parameter per rank, held by stage 0 (e.g. embedding) and the last stage (head).
        self._tied: nn.Parameter | None = None
        self._tie_role: str | None = None  # "first" | "last" | None (middle rank)
        tied = self.stage_cls.tied_weight(self.model)
        if tied is not None and pp_size > 1:
            self._tied = tied
            self._tie_role = "first" if self.stages[0].is_first else "last" if self.holds_last else None
            if pp_size > 2 and self._tie_role is not None and tied_group is None:
                raise ValueError(
                    f"tied weights with pp={pp_size}: pass tied_group, the group of this pipeline's first- "
                    "and last-stage ranks (the trainer builds it)"
                )
        self._schedules: OrderedDict = OrderedDict()  # shape signature -> (schedule, PipelineStages)

    # ---- schedules --------------------------------------------------------------------------------
    def _schedule_for(self, sig):
        if sig in self._schedules:
            self._schedules.move_to_end(sig)
            return self._schedules[sig]
        pstages = [
            PipelineStage(m, m.stage_index, self.num_stages, self.device, group=self.group)
            for m in self.stages
        ]
        cls = SCHEDULES[self.schedule_name]
        first = pstages[0] if self.schedule_name in _SINGLE else pstages
        # scale_grads=False: gradients are sums over micro-batches, like the losses
        sched = cls(first, self.n_microbatches, loss_fn=_stage_loss, scale_grads=False)
        self._schedules[sig] = (sched, pstages)
        if len(self._schedules) > self.max_cached_shapes:  # same order on every rank: same eviction
            self._schedules.popitem(last=False)
        return sched, pstages

    def step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, int]:
        """Forward + backward of every micro-batch; returns (summed loss (float64 scalar, identical on every
        pipeline rank), summed count). Gradients are ADDED to the stage parameters' .grad (zero them
        between optimizer steps); tied-embedding gradients are summed across ranks before returning.

        Example: `loss_sum, count = pipe.step([{"latents": x, "timestep": t, "text_context": c, "target": y}] * 4)`.
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("Pipeline.step runs backward; call it outside torch.no_grad()")
        if len(micro_batches) != self.n_microbatches:
            raise ValueError(
                f"micro_batches: got {len(micro_batches)}, this pipeline runs n_microbatches={self.n_microbatches}"
            )
        args, kwargs, targets, count, sig = self.stage_cls.prepare(
            self.model, micro_batches, self.device, self.seq_len
        )
        sched, pstages = self._schedule_for(sig)
        if self._tie_role == "last" and self._tied.requires_grad:
            # The two copies' grads are equal here (synced last step, or both zeroed); keeping only the
            # first stage's lets the sum after this step count the previous gradient once.
            self._tied.grad = None
        for st in pstages:  # what schedule.step() does before running the micro-batches
            st.has_backward = True
            st.clear_runtime_states()
        losses: list[torch.Tensor] = []
        # Private entry point: pre-split micro-batches with per-micro-batch keywords and targets
        # (`step()` would chunk one whole batch instead); checked against torch 2.13.
        sched._step_microbatches(args, kwargs, targets, losses, return_outputs=False)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.holds_last:
            total += sum(loss.detach().double() for loss in losses)
        dist.all_reduce(total, group=self.group)  # only the last stage's rank adds a non-zero
        self.sync_tied_grads()
        return total, count

    # ---- gradients --------------------------------------------------------------------------------
    def sync_tied_grads(self) -> None:
        """Sum the tied embedding/head gradient of stage 0 and the last stage across their ranks.

        `step` calls this; call it yourself only if you add gradients outside `step`. No-op without
        tied embeddings and on middle ranks. Example: `pipe.sync_tied_grads()`.
        """
        p = self._tied
        if p is None or not p.requires_grad or self._tie_role is None:
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(
            local_tensor(p.grad), group=self.tied_group if self.tied_group is not None else self.group
        )

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter of this rank's stages, once (the optimizer's and grad clipping's list; the tied
        head is included on the last stage's rank so both copies are updated alike).

        Example: `opt = torch.optim.AdamW(pipe.parameters(), lr=1e-4)`.
        """
        seen, out = set(), []
        for st in self.stages:
            for p in st.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def unique_parameters(self) -> list[nn.Parameter]:
        """This rank's stage parameters, each once, the tied head left out on the last stage's rank so a
        sum over pipeline ranks counts every model parameter exactly once (grad norms, param counts).

        Example: `sq = sum(p.grad.pow(2).sum() for p in pipe.unique_parameters() if p.grad is not None)`.
        """
        return [p for p in self.parameters() if not (p is self._tied and self._tie_role == "last")]

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients over the pipeline group (float64 scalar, same on every rank).

        With FSDP/TP the local shards are summed here; reduce the squared norm over those groups too.
        Example: `torch.nn.utils.clip_grads_with_norm_(pipe.parameters(), 1.0, pipe.grad_norm())`.
        """
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.unique_parameters():
            if p.grad is not None:
                sq += local_tensor(p.grad).double().pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        return sq.sqrt()


def merge_stages(stages: list[nn.Module]) -> nn.Module:
    """One module holding this rank's stages under the full model's names (for the optimizer, the
    checkpoint and EMA): children of the same name are merged recursively (layer dicts united).

    Example: `owned = merge_stages(split_stages(model, "wan", 2, 0, [[1, 1], [1, 1]]))`.
    """
    root = nn.Module()

    def merge(dst: nn.Module, src: nn.Module) -> None:
        for name, child in src.named_children():
            have = getattr(dst, name, None) if name in dst._modules else None
            if have is None:
                if isinstance(child, nn.ModuleDict):
                    dst.add_module(name, nn.ModuleDict(dict(child.items())))
                elif type(child) is nn.Module:  # a plain namespace of a stage (e.g. `language`)
                    dst.add_module(name, nn.Module())
                    merge(dst._modules[name], child)
                else:
                    dst.add_module(name, child)
            elif isinstance(have, nn.ModuleDict) and isinstance(child, nn.ModuleDict):
                have.update(dict(child.items()))
            elif have is not child:
                merge(have, child)
        for name, p in src.named_parameters(recurse=False):
            if name not in dst._parameters:
                dst.register_parameter(name, p)

    for st in stages:
        merge(root, st)
    return root
