"""Pipeline stages: a single-device model cut into consecutive pieces, one `nn.Module` per stage.

A stage holds REFERENCES to the model's own submodules under the model's attribute paths (layers in
an `nn.ModuleDict` keyed by their original index), so `stage.state_dict()` keys are exactly the full
model's names ("blocks.3.attn.q.weight", "language.layers.5.mlp.up_proj.weight") and a distributed
checkpoint reshards freely between pipeline layouts. The model itself is never edited.

What each stage holds (every stage holds at least one layer):
- Wan: stage 0 the patch/text/time(/image) embeddings, the last stage the head.
- Qwen2.5-VL: stage 0 the whole vision tower and `language.embed_tokens`, the last stage
  `language.norm` and `language.lm_head` (with tied embeddings that is the embedding matrix again).

Stage forward contracts (what `pp.Pipeline` feeds them; tensors between stages have fixed shapes):
- Wan: stage 0 takes (latents, timestep, text_context[, image_context]); every stage passes on
  (x (B, S, D), e (B, 6, D) fp32, ctx (B, L, D), temb (B, D) fp32[, ctx_img (B, L_img, D)]);
  the last stage returns the prediction (B, C_out, T, H, W) fp32, or the summed squared error when
  given `target`. Keyword `grid` = (frames, height, width) in patches goes to every stage.
- Qwen2.5-VL: stage 0 takes input_ids (1, S) (+ media keywords); stages pass hidden (1, S, D); the
  last returns the final-normed hidden, or the summed next-token cross-entropy when given `labels`.
  Keywords `position_ids` (3, 1, S) and `cu_seqlens` (list of ints) go to every stage.
With a parallel plan (`parallel/plans/`, tensor / context parallelism inside the stages), every stage
calls the plan's pieces instead: stage 0 embeds and cuts the sequence (`plan.enter`), every stage runs
its layers on this rank's piece (RoPE / packing metadata from `plan.local_rope` / `plan.row_meta`), and
the last stage returns `plan.head_loss` (partial over the sequence shards, like the plan's own forward).
This file holds no process-group code; `pp.py` runs the stages, the plan owns the collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.models.wan.model import _modulate

FAMILIES = ("wan", "qwen2_5_vl")
IGNORE_INDEX = -100


def plan_layers(
    num_layers: int, pp_size: int, pp_layers: list[int] | list[list[int]] | None, virtual: int = 1
) -> list[list[int]]:
    """Layer indices of every pipeline stage, in stage order (stage s runs on rank s % pp_size).

    `pp_layers`: flat [a, b] = one stage per rank; nested [[a, b], [c, d]] = pp 2 x virtual 2 (stages
    0..3 hold a, b, c, d layers; rank 0 runs stages 0 and 2); None = an even split into
    pp_size * virtual stages (later stages take the remainder).
    Example: `plan_layers(4, 2, [1, 3])` -> `[[0], [1, 2, 3]]`.
    """
    if pp_size < 1 or virtual < 1:
        raise ValueError(f"parallel.pp={pp_size}, virtual stages {virtual}: both must be >= 1")
    if pp_layers is None:
        n = pp_size * virtual
        if num_layers < n:
            raise ValueError(
                f"parallel.pp={pp_size} x {virtual} virtual stages = {n} stages but the model has only "
                f"{num_layers} layers; every stage needs at least one layer: lower parallel.pp"
            )
        counts = [num_layers // n + (1 if s >= n - num_layers % n else 0) for s in range(n)]
    else:
        nested = all(isinstance(c, (list, tuple)) for c in pp_layers)
        rows = [list(r) for r in pp_layers] if nested else [list(pp_layers)]
        if not rows or any(isinstance(c, (list, tuple)) for r in rows for c in r):
            raise ValueError(
                f"parallel.pp_layers={pp_layers!r}: give a list of ints (one per stage) or a list of such "
                "lists (one per virtual round), not a mix"
            )
        for r in rows:
            if len(r) != pp_size:
                raise ValueError(
                    f"parallel.pp_layers={pp_layers!r}: {len(r)} layer counts in {r} but parallel.pp={pp_size}; "
                    "give one count per pipeline rank (nested lists: one list per virtual round)"
                )
        counts = [int(c) for r in rows for c in r]
        empty = [s for s, c in enumerate(counts) if c < 1]
        if empty:
            raise ValueError(
                f"parallel.pp_layers={pp_layers!r}: stage {empty[0]} would hold {counts[empty[0]]} layers; "
                "every pipeline stage needs at least one layer (stage 0 too)"
            )
        if sum(counts) != num_layers:
            raise ValueError(
                f"parallel.pp_layers={pp_layers!r} sums to {sum(counts)} but the model has {num_layers} "
                "layers; the counts must add up to the layer count"
            )
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [list(range(a, a + c)) for a, c in zip(starts, counts)]


class _Stage(nn.Module):
    """Common bookkeeping: position in the pipeline, an unregistered handle on the full model, and the
    optional parallel plan (`parallel/plans/`) whose tensor/context-parallel pieces the stage runs."""

    def __init__(self, model: nn.Module, stage_index: int, num_stages: int, layer_ids: list[int], plan=None):
        super().__init__()
        self.stage_index, self.num_stages, self.layer_ids = stage_index, num_stages, list(layer_ids)
        # Kept outside the module tree (no state_dict keys, no parameters()): used only for the
        # model's parameter-free helpers and its embedding methods, which read the very submodules
        # this stage registers below; the plan, when given, supplies the sequence split/head/loss.
        object.__setattr__(self, "full_model", model)
        object.__setattr__(self, "plan", plan)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def extra_repr(self) -> str:
        return f"stage {self.stage_index}/{self.num_stages}, layers {self.layer_ids}"


class WanStage(_Stage):
    """Consecutive blocks of a `WanTransformer` (+ embeddings on stage 0, head on the last stage).

    Example (one process, stages chained by hand):
        s0, s1 = (WanStage(model, i, 2, ids) for i, ids in enumerate([[0], [1]]))
        pred = s1(*s0(latents, t, ctx, grid=(2, 4, 4)), grid=(2, 4, 4))  # == model(latents, t, ctx)
    """

    def __init__(self, model: nn.Module, stage_index: int, num_stages: int, layer_ids: list[int], plan=None):
        super().__init__(model, stage_index, num_stages, layer_ids, plan)
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

    def forward(
        self,
        *acts: torch.Tensor,
        grid: tuple[int, int, int],
        target: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ):
        m, plan = self.full_model, self.plan
        if self.is_first:
            latents, timestep, text_context, *image = acts  # (B, C_in, T, H, W), (B,), (B, L, text_dim)
            x = m.patchify(latents)  # (B, S, D)
            temb, e = m.embed_time(timestep)  # (B, D), (B, 6, D) fp32
            ctx = m.embed_text(text_context)  # (B, L, D)
            ctx_img = m.image_embed(image[0].to(m.dtype)) if image else None  # (B, L_img, D)
            if plan is not None:  # this rank's tokens from here on (B, S_local, D)
                x, e, temb = plan.enter(x, e, temb)
        else:
            x, e, ctx, temb, *image = acts
            ctx_img = image[0] if image else None
        if plan is not None:
            rope = plan.local_rope(tuple(grid), x.device, x.dtype)
        else:
            rope = m._rope(tuple(grid), x.device, x.dtype)
        for block in self.blocks.values():
            x = block(x, e, ctx, ctx_img, rope)
        if not self.is_last:
            return (x, e, ctx, temb) + ((ctx_img,) if ctx_img is not None else ())
        if plan is not None:
            if target is None:
                raise ValueError("a pipeline stage under a tensor/context-parallel plan needs `target`")
            return plan.head_loss(x, temb, target, weight)[0]  # partial over the sequence shards
        # head: modulated norm, projection, unpatchify (as WanTransformer.forward)
        shift, scale = (self.head.modulation.float() + temb.unsqueeze(1)).unbind(1)  # (B, D) fp32
        pred = m.unpatchify(self.head.proj(_modulate(x, shift, scale, m.cfg.eps)), tuple(grid)).float()
        if target is None:
            return pred
        err = (pred - target.float()).pow(2)  # (B, C_out, T, H, W)
        if weight is not None:  # per-sample loss weights (B,), e.g. min-SNR
            err = err * weight.float().view(-1, *([1] * (err.ndim - 1)))
        return err.sum()


class QwenStage(_Stage):
    """Consecutive decoder layers of a `Qwen2_5_VLModel` (+ vision tower and token embedding on stage 0,
    final norm and LM head on the last stage), for packed rows (1, S) with `cu_seqlens`.

    Example (one process, stages chained by hand):
        s0, s1 = (QwenStage(model, i, 2, ids) for i, ids in enumerate([[0], [1]]))
        kw = dict(position_ids=pos, cu_seqlens=[0, 7, 12])
        hidden = s1(s0(ids, **kw), **kw)  # == model(ids, position_ids=pos, cu_seqlens=..., return_hidden=True)
    """

    def __init__(self, model: nn.Module, stage_index: int, num_stages: int, layer_ids: list[int], plan=None):
        super().__init__(model, stage_index, num_stages, layer_ids, plan)
        lm = model.language
        if self.is_first:
            self.visual = model.visual
        self.language = nn.Module()
        if self.is_first:
            self.language.embed_tokens = lm.embed_tokens
        self.language.layers = nn.ModuleDict({str(i): lm.layers[i] for i in layer_ids})
        if self.is_last:
            self.language.norm = lm.norm
            self.language.lm_head = lm.lm_head  # with tied embeddings its weight IS embed_tokens.weight
        self.language.rope = lm.rope  # parameter-free M-RoPE tables

    def forward(
        self,
        *acts: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: list[int],
        labels: torch.Tensor | None = None,
        **media: torch.Tensor,
    ):
        lang, plan = self.language, self.plan
        if plan is not None:  # this rank's piece of the row (tensor/context parallel, see the plan)
            x = plan.embed(acts[0], **media) if self.is_first else acts[0]  # (1, S, D) | (1, S_local, D)
            meta = plan.row_meta(position_ids, cu_seqlens, labels, x.dtype)
            x = plan.enter(x) if self.is_first else x
            x = plan.layers(x, meta, lang.layers.values())
            if not self.is_last:
                return x
            if labels is None:
                raise ValueError("a pipeline stage under a tensor/context-parallel plan needs `labels`")
            return plan.head_loss(x, meta)[0]  # partial over the sequence shards
        if self.is_first:
            x = self.full_model.embed(acts[0], **media)  # (1, S, D), vision features at the placeholders
        else:
            (x,) = acts  # (1, S, D)
        cos, sin = lang.rope(position_ids, x.dtype)  # (1, S, Dh) each
        for layer in lang.layers.values():
            x = layer(x, cos, sin, None, cu_seqlens=cu_seqlens)
        if not self.is_last:
            return x
        x = lang.norm(x)
        if labels is None:
            return x
        targets = labels[:, 1:]  # position i predicts token i + 1
        keep = targets != IGNORE_INDEX
        logits = lang.lm_head(x[:, :-1][keep])  # (K, vocab) at supervised positions only
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def split_stages(
    model: nn.Module,
    family: str,
    pp_size: int,
    pp_rank: int,
    pp_layers: list[int] | list[list[int]] | None = None,
    virtual: int = 1,
    plan=None,
) -> list[nn.Module]:
    """This rank's pipeline stage modules, in stage order: stages pp_rank, pp_rank + pp_size, ...

    `family`: "wan" (`WanTransformer`) or "qwen2_5_vl" (`Qwen2_5_VLModel`). `pp_layers` as in
    `plan_layers`; `virtual` (stages per rank) is used only when pp_layers is None. The model is
    not modified; layers of other ranks' stages stay in it but this rank's stages never touch them.
    Example:
        stages = split_stages(dit, "wan", pp_size=2, pp_rank=dist.get_rank(), pp_layers=[12, 18])
        stages[0].state_dict().keys()  # "patch_embed.weight", ..., "blocks.11.mlp.fc2.bias"
    """
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r}: pipeline stages exist for {', '.join(FAMILIES)}")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} must be in [0, parallel.pp={pp_size})")
    if family == "wan":
        num_layers, cls = len(model.blocks), WanStage
    else:
        num_layers, cls = len(model.language.layers), QwenStage
    layers = plan_layers(num_layers, pp_size, pp_layers, virtual)
    n = len(layers)
    return [cls(model, s, n, layers[s], plan) for s in range(pp_rank, n, pp_size)]
