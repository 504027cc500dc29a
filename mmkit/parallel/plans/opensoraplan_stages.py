"""OpenSoraPlan 1.3 pipeline stages (`pp_stages.split_stages` builds them, `pp.Pipeline` runs them).

Stage 0 holds the patch (and i2v masked-video / mask) embeddings, the caption projection and the
adaLN-single time embedding, the last stage the head; every stage at least one block (stage 0 may hold
fewer, as MindSpeed puts the encoders there: `parallel.pp_layers = [6, 13, 13]`). Stages compose the
model's own pieces (`embed`, `biases`, blocks, `head_tokens`); under a plan, the plan's (`enter`,
`local_rope`, `head_loss`).

Stage forward contract (fixed shapes between stages): stage 0 takes (latents, timestep, caption,
caption_mask); every stage passes on (x (B, S, D), e (B, 6, D), ctx (B, L, D), temb (B, D), text bias
(B, L)); the last stage returns the prediction (B, C_out, T, H, W), or the summed squared error when
given `target`. Keywords go to every stage: `grid` = (frames, height, width) in patches, and for a
batch with padded latents `video_mask` (B, T, H, W) (each stage turns it into the video key bias, the
last one masks the loss with it).
"""

from __future__ import annotations

import torch
from torch import nn

from mmkit.parallel.pp_stages import Stage


class OpenSoraPlanStage(Stage):
    """Consecutive blocks of an `OpenSoraPlanTransformer` (+ embeddings on stage 0, head on the last).

    Example (one process, stages chained by hand):
        s0, s1 = (OpenSoraPlanStage(model, i, 2, ids) for i, ids in enumerate([[0], [1]]))
        pred = s1(*s0(latents, t, caption, mask, grid=(3, 3, 5)), grid=(3, 3, 5))
    """

    def __init__(
        self, model: nn.Module, stage_index: int, num_stages: int, layer_ids: list[int], plan=None, loss=None
    ):
        super().__init__(model, stage_index, num_stages, layer_ids, plan, loss)
        if self.is_first:
            for name in (
                "patch_embed",
                "masked_embed",
                "mask_embed",
                "text_embed",
                "time_embed",
                "time_proj",
            ):
                if hasattr(model, name):
                    setattr(self, name, getattr(model, name))
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layer_ids})
        if self.is_last:
            self.head = model.head

    @staticmethod
    def num_layers(model: nn.Module) -> int:
        return len(model.blocks)

    def forward(
        self,
        *acts: torch.Tensor,
        grid: tuple[int, int, int],
        target: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
    ):
        m, plan = self.full_model, self.plan
        if self.is_first:
            latents, t, caption, caption_mask = acts
            x, temb, e, ctx = m.embed(latents, t, caption)
            _, tbias = m.biases(None, caption_mask)
            if plan is not None:
                x, e, temb = plan.enter(x, e, temb)
        else:
            x, e, ctx, temb, tbias = acts
        vbias = m.biases(video_mask, None)[0]  # (B, S) or None
        rope = (
            plan.local_rope(grid, x.device, x.dtype) if plan is not None else m.rope(grid, x.device, x.dtype)
        )
        for block in self.blocks.values():
            x = block(x, e, ctx, rope, vbias, tbias)
        if not self.is_last:
            return x, e, ctx, temb, tbias
        if plan is not None:
            if target is None:
                raise ValueError("a pipeline stage under a tensor/context-parallel plan needs `target`")
            return plan.head_loss(x, temb, target, weight, video_mask)[0]
        pred = m.unpatchify(m.head_tokens(x, temb), tuple(grid)).float()
        if target is None:
            return pred
        return self.loss_fn(pred, target, video_mask, weight)[0]

    @staticmethod
    def prepare(model: nn.Module, mbs: list[dict], device, seq_len: int | None = None):
        """Check a step's micro-batches (keys present, shapes shared) and lay them out for the schedule:
        stage-0 args, per-stage keywords (`grid`, `target`, `weight`, `video_mask` where a micro-batch
        has padded latents) and the step's count (real latent elements x channels)."""
        from mmkit.parallel.plans.opensoraplan import OpenSoraPlanPlan

        need = ("latents", "timestep", "text_context", "text_mask", "target")
        first = mbs[0]
        for i, mb in enumerate(mbs):
            missing = [k for k in need if k not in mb]
            if missing:
                raise ValueError(
                    f"micro_batches[{i}]: missing {missing}; an OpenSoraPlan micro-batch holds {need}"
                )
            for k in ("latents", "text_context", "target", "weight"):
                a, b = mb.get(k), first.get(k)
                if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
                    raise ValueError(
                        f"micro_batches[{i}][{k!r}]: shape {None if a is None else tuple(a.shape)} differs from "
                        f"micro_batches[0]'s {None if b is None else tuple(b.shape)}; pipeline stages exchange "
                        "fixed-shape activations, so one step's micro-batches must share shapes (bucket them)"
                    )
        latents = first["latents"]
        model.check_input(latents, first["text_context"])
        B, _, T, H, W = latents.shape
        out_shape = (B, model.cfg.out_channels, T, H, W)
        if tuple(first["target"].shape) != out_shape:
            raise ValueError(
                f"micro_batches[*]['target']: shape {tuple(first['target'].shape)}, expected {out_shape}"
            )
        grid = model.grid(latents)
        padded = any(OpenSoraPlanPlan.real_mask(mb) is not None for mb in mbs)
        args, kwargs, targets, count = [], [], [], 0
        for mb in mbs:
            t = torch.as_tensor(mb["timestep"], device=device).reshape(-1).expand(B).contiguous()
            a = (
                mb["latents"].to(device),
                t,
                mb["text_context"].to(device),
                mb["text_mask"].float().to(device),
            )
            target = mb["target"].to(device)
            kw = {"grid": grid, "target": target}
            if mb.get("weight") is not None:
                kw["weight"] = mb["weight"].to(device)
            if padded:  # every micro-batch gets a mask: the stages see one set of keywords per step
                vm = mb.get("video_mask")
                vm = torch.ones(B, T, H, W, device=device) if vm is None else vm.to(device)
                kw["video_mask"] = vm
                count += int(vm.bool().sum()) * model.cfg.out_channels
            else:
                count += mb["target"].numel()
            args.append(a)
            kwargs.append(kw)
            targets.append(target)
        sig = ("opensoraplan",) + tuple((tuple(x.shape), x.dtype) for x in args[0]) + (tuple(kwargs[0]),)
        return args, kwargs, targets, count, sig
