"""Wan2.1 pipeline stages (`pp_stages.split_stages` builds them, `pp.Pipeline` runs them).

What each stage holds (every stage holds at least one block): stage 0 the patch/text/time(/image)
embeddings, the last stage the head. Stages compose the model's own pieces (`embed`, `blocks`,
`head_tokens`); under a plan, the plan's (`enter`, `local_rope`, `head_loss`).

Stage forward contract (tensors between stages have fixed shapes): stage 0 takes (latents, timestep,
text_context[, image_context]); every stage passes on (x (B, S, D), e (B, 6, D) fp32, ctx (B, L, D),
temb (B, D) fp32[, ctx_img (B, L_img, D)]); the last stage returns the prediction (B, C_out, T, H, W)
fp32, or the summed squared error when given `target`. Keyword `grid` = (frames, height, width) in
patches goes to every stage. A step's micro-batches must share their shapes (`WanStage.prepare`).
"""

from __future__ import annotations

import torch
from torch import nn

from mmkit.parallel.pp_stages import Stage


class WanStage(Stage):
    """Consecutive blocks of a `WanTransformer` (+ embeddings on stage 0, head on the last stage).

    Example (one process, stages chained by hand):
        s0, s1 = (WanStage(model, i, 2, ids) for i, ids in enumerate([[0], [1]]))
        pred = s1(*s0(latents, t, ctx, grid=(2, 4, 4)), grid=(2, 4, 4))  # == model(latents, t, ctx)
    """

    def __init__(
        self, model: nn.Module, stage_index: int, num_stages: int, layer_ids: list[int], plan=None, loss=None
    ):
        super().__init__(model, stage_index, num_stages, layer_ids, plan, loss)
        if self.is_first:
            self.patch_embed = model.patch_embed
            self.text_embed = model.text_embed
            self.time_embed = model.time_embed
            self.time_proj = model.time_proj
            if model.image_embed is not None:
                self.image_embed = model.image_embed
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
    ):
        m, plan = self.full_model, self.plan
        if self.is_first:
            # (B, C_in, T, H, W), (B,), (B, L, text_dim)[, (B, L_img, image_dim)]
            x, temb, e, ctx, ctx_img = m.embed(*acts)
            if plan is not None:  # this rank's tokens from here on (B, S_local, D)
                x, e, temb = plan.enter(x, e, temb)
        else:
            x, e, ctx, temb, *image = acts
            ctx_img = image[0] if image else None
        if plan is not None:
            rope = plan.local_rope(grid, x.device, x.dtype)
        else:
            rope = m.rope(grid, x.device, x.dtype)
        for block in self.blocks.values():
            x = block(x, e, ctx, ctx_img, rope)
        if not self.is_last:
            return (x, e, ctx, temb) + ((ctx_img,) if ctx_img is not None else ())
        if plan is not None:
            if target is None:
                raise ValueError("a pipeline stage under a tensor/context-parallel plan needs `target`")
            return plan.head_loss(x, temb, target, weight)[0]  # partial over the sequence shards
        pred = m.unpatchify(m.head_tokens(x, temb), tuple(grid)).float()  # as WanTransformer.forward
        if target is None:
            return pred
        return self.loss_fn(pred, target, weight=weight)[0]  # per-sample weights (B,), e.g. min-SNR

    @staticmethod
    def prepare(model: nn.Module, mbs: list[dict], device, seq_len: int | None = None):
        """Check a step's micro-batches (all keys present, shapes shared, the model accepts them) and lay
        them out for the schedule: stage-0 args, per-stage keywords (`grid`, `target`, `weight`)."""
        need = ("latents", "timestep", "text_context", "target")
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
        grid = model.grid(latents)
        args, kwargs, targets = [], [], []
        for mb in mbs:
            t = torch.as_tensor(mb["timestep"], device=device).reshape(-1).expand(B).contiguous()
            a = [mb["latents"].to(device), t, mb["text_context"].to(device)]
            if mb.get("image_context") is not None:
                a.append(mb["image_context"].to(device))
            target = mb["target"].to(device)
            kw = {"grid": grid, "target": target}
            if mb.get("weight") is not None:
                kw["weight"] = mb["weight"].to(device)
            args.append(tuple(a))
            kwargs.append(kw)
            targets.append(target)
        sig = ("wan",) + tuple((tuple(x.shape), x.dtype) for x in args[0]) + (tuple(kwargs[0]),)
        count = sum(mb["target"].numel() for mb in mbs)
        return args, kwargs, targets, count, sig
