"""Pipeline parallelism: run a model's stages (`pp_stages.split_stages`) on the ranks of a pipeline
process group with a `torch.distributed.pipelining` schedule (GPipe, 1F1B, interleaved 1F1B).

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
- activations must have fixed shapes within a step: Wan micro-batches must share their shapes, Qwen
  packed rows are padded to `seq_len` with an extra segment of -100 labels (attention never crosses
  segments, so padding never changes a real token's result). Vision inputs (any size, or none) are
  consumed on stage 0 only. A step whose shapes differ from the last one builds (and caches) a new
  schedule; building runs one extra forward/backward of micro-batch 0 to infer the buffer shapes.

Tied embeddings (Qwen `tie_word_embeddings`): stage 0 and the last stage each hold the matrix; after
backward `sync_tied_grads` sums the two gradients across their ranks (`step` calls it).
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

from mmkit.models.qwen2_5_vl.model import check_placeholders
from mmkit.parallel.comm import local_tensor
from mmkit.parallel.pp_stages import FAMILIES, IGNORE_INDEX, plan_layers, split_stages

__all__ = ["SCHEDULES", "Pipeline", "plan_layers", "split_stages"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
_SINGLE = ("gpipe", "1f1b")  # one stage per rank
_MEDIA = (("pixel_values", "image_grid_thw", "image"), ("pixel_values_videos", "video_grid_thw", "video"))


def _stage_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss_fn: the last stage already returns the summed loss of its micro-batch."""
    return output


class Pipeline:
    """Runs this rank's stages with a pipelining schedule; one `step` = all micro-batches, fwd + bwd.

    `stages`: this rank's modules from `split_stages` (same pp_size and rank as `pp_group`).
    `schedule`: "gpipe" | "1f1b" (one stage per rank) | "interleaved_1f1b" (any number per rank).
    `seq_len` (Qwen only): fixed packed-row length every micro-batch is padded to; None = the step's
    longest row rounded up to a multiple of 64 (a new length rebuilds the schedule once).
    `tied_group`: the group of just the first- and last-stage ranks of this pipeline, for the tied-
    embedding gradient sum; needed on those ranks when pp > 2 (with pp = 2 the pp group is that pair).
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
        if family not in FAMILIES:
            raise ValueError(f"model.family={family!r}: pipelines exist for {', '.join(FAMILIES)}")
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
        # Tied embedding: one Parameter per rank, held by stage 0 (embedding) and the last stage (head).
        self._tied: nn.Parameter | None = None
        self._tie_role: str | None = None  # "first" | "last" | None (middle rank)
        if family == "qwen2_5_vl" and self.model.cfg.tie_word_embeddings and pp_size > 1:
            self._tied = self.model.language.embed_tokens.weight
            self._tie_role = "first" if self.stages[0].is_first else "last" if self.holds_last else None
            if pp_size > 2 and self._tie_role is not None and tied_group is None:
                raise ValueError(
                    f"tied embeddings with pp={pp_size}: pass tied_group, the group of this pipeline's first- "
                    "and last-stage ranks (the trainer builds it)"
                )
        self._schedules: OrderedDict = OrderedDict()  # shape signature -> (schedule, PipelineStages)

    # ---- micro-batch preparation (pure, same result on every rank) ----------------------------------
    def _prepare_wan(self, mbs: list[dict]):
        model, need = self.model, ("latents", "timestep", "text_context", "target")
        first = mbs[0]
        for i, mb in enumerate(mbs):
            missing = [k for k in need if k not in mb]
            if missing:
                raise ValueError(f"micro_batches[{i}]: missing {missing}; a Wan micro-batch holds {need}")
            for k in ("latents", "text_context", "image_context", "target", "weight"):
                a, b = mb.get(k), first.get(k)
                if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
                    raise ValueError(
                        f"micro_batches[{i}][{k!r}]: shape {None if a is None else tuple(a.shape)} differs from "
                        f"micro_batches[0]'s {None if b is None else tuple(b.shape)}; pipeline stages exchange "
                        "fixed-shape activations, so one step's micro-batches must share shapes (bucket them)"
                    )
        latents = first["latents"]
        model.check_input(latents, first.get("image_context"))
        B, _, T, H, W = latents.shape
        out_shape = (B, model.cfg.out_channels, T, H, W)
        if tuple(first["target"].shape) != out_shape:
            raise ValueError(
                f"micro_batches[*]['target']: shape {tuple(first['target'].shape)}, expected {out_shape} "
                "(out_channels of the model, the latents' batch and grid)"
            )
        pt, ph, pw = model.cfg.patch_size
        grid = (T // pt, H // ph, W // pw)
        dev = self.device
        args, kwargs, targets = [], [], []
        for mb in mbs:
            t = torch.as_tensor(mb["timestep"], device=dev).reshape(-1).expand(B).contiguous()
            a = [mb["latents"].to(dev), t, mb["text_context"].to(dev)]
            if mb.get("image_context") is not None:
                a.append(mb["image_context"].to(dev))
            target = mb["target"].to(dev)
            kw = {"grid": grid, "target": target}
            if mb.get("weight") is not None:
                kw["weight"] = mb["weight"].to(dev)
            args.append(tuple(a))
            kwargs.append(kw)
            targets.append(target)
        sig = ("wan",) + tuple((tuple(x.shape), x.dtype) for x in args[0]) + (tuple(kwargs[0]),)
        count = sum(mb["target"].numel() for mb in mbs)
        return args, kwargs, targets, count, sig

    def _check_media(self, i: int, ids: torch.Tensor, mb: dict) -> None:
        cfg = self.model.cfg
        merge = cfg.vision.spatial_merge_size
        for pv_key, grid_key, name in _MEDIA:
            tok = cfg.image_token_id if name == "image" else cfg.video_token_id
            where = ids == tok
            pv, grid = mb.get(pv_key), mb.get(grid_key)
            if pv is None:
                if bool(where.any()):
                    raise ValueError(
                        f"micro_batches[{i}]: {int(where.sum())} {name} placeholder tokens but no {pv_key}"
                    )
                continue
            if grid is None:
                raise ValueError(f"micro_batches[{i}]: {pv_key} given without {grid_key}")
            need = int(grid.prod(-1).sum())
            if pv.shape[0] != need or bool((grid[:, 1:] % merge).any()):
                raise ValueError(
                    f"micro_batches[{i}]: {pv_key} has {pv.shape[0]} patches, {grid_key}={grid.tolist()} "
                    f"needs {need} with h and w divisible by spatial_merge_size={merge}"
                )
            try:
                check_placeholders(where, (grid.prod(-1) // merge**2).tolist(), name)
            except ValueError as e:
                raise ValueError(f"micro_batches[{i}]: {e}") from None

    def _prepare_qwen(self, mbs: list[dict]):
        rows = []
        for i, mb in enumerate(mbs):
            missing = [k for k in ("input_ids", "position_ids", "cu_seqlens", "labels") if k not in mb]
            if missing:
                raise ValueError(f"micro_batches[{i}]: missing {missing} (a packed Qwen2.5-VL row)")
            ids = mb["input_ids"]
            n = ids.shape[-1]
            cu = [int(c) for c in mb["cu_seqlens"]]
            if (
                ids.ndim != 2
                or ids.shape[0] != 1
                or tuple(mb["position_ids"].shape) != (3, 1, n)
                or tuple(mb["labels"].shape) != (1, n)
            ):
                raise ValueError(
                    f"micro_batches[{i}]: expected input_ids (1, N), position_ids (3, 1, N), labels (1, N); got "
                    f"{tuple(ids.shape)}, {tuple(mb['position_ids'].shape)}, {tuple(mb['labels'].shape)}"
                )
            if len(cu) < 2 or cu[0] != 0 or cu[-1] != n or cu != sorted(cu):
                raise ValueError(f"micro_batches[{i}]: cu_seqlens={cu[:8]}... must rise from 0 to N={n}")
            self._check_media(i, ids, mb)
            rows.append((ids, cu))
        longest = max(ids.shape[1] for ids, _ in rows)
        S = self.seq_len or -(-longest // 64) * 64
        if longest > S:
            worst = max(range(len(rows)), key=lambda j: rows[j][0].shape[1])
            raise ValueError(
                f"micro_batches[{worst}]: packed row of {longest} tokens exceeds seq_len={S}; raise seq_len "
                "or pack fewer tokens per micro-batch"
            )
        pad_id = self.model.cfg.pad_token_id or 0
        dev = self.device
        args, kwargs, targets, count = [], [], [], 0
        for mb, (ids, cu) in zip(mbs, rows):
            n, pad = ids.shape[1], S - ids.shape[1]
            ids = torch.cat([ids, ids.new_full((1, pad), pad_id)], 1)  # (1, S)
            pos = mb["position_ids"]
            pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype).expand(3, 1, pad)], 2)  # (3, 1, S)
            labels = torch.cat([mb["labels"], mb["labels"].new_full((1, pad), IGNORE_INDEX)], 1)  # (1, S)
            count += int((mb["labels"][:, 1:] != IGNORE_INDEX).sum())
            kw = {
                "position_ids": pos.to(dev),
                "cu_seqlens": cu + [S] if pad else cu,  # the padding is a segment of its own
                "labels": labels.to(dev),
            }
            for pv_key, grid_key, _ in _MEDIA:
                if mb.get(pv_key) is not None:
                    kw[pv_key], kw[grid_key] = mb[pv_key].to(dev), mb[grid_key].to(dev)
            args.append((ids.to(dev),))
            kwargs.append(kw)
            targets.append(kw["labels"])
        return args, kwargs, targets, count, ("qwen2_5_vl", S)

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
        prepare = self._prepare_wan if self.family == "wan" else self._prepare_qwen
        args, kwargs, targets, count, sig = prepare(micro_batches)
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
