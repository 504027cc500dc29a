"""Qwen2.5-VL SFT: tensor + sequence parallel on the LLM, context parallel, FSDP2.

Forward under a plan (`Qwen2_5_VLPlan.forward(prep)`, packed rows):
  vision tower + token embeddings on the whole packed row (replicated; a rank whose micro-batch has no
  image still runs the tower on a dummy patch grid with zero weight, so every rank issues the same
  FSDP collectives and none waits forever)
  -> pad N to a multiple of cp x tp(SP), cut over cp, then over tp (SP)
  -> decoder layers: attention and MLP all-gather the tp pieces (heads / MLP columns split over tp);
     attention is causal inside each packed sample, context-parallel over cp
  -> final norm and LM head on this rank's supervised positions -> summed cross-entropy (the task's,
     `task.loss_fn`; vocabulary-parallel under tensor parallelism).
TP shards (DTensor) q/k/v/o and gate/up/down of every decoder layer, and the token embedding and LM
head over vocabulary rows (`VocabParallelEmbedding`, `vocab_parallel_cross_entropy`: no rank holds the
full logits). The vision tower and the norms stay replicated (FSDP2 shards them over data ranks).
FSDP2 units: every decoder and vision block, and (untied) the token embedding and the LM head.
Pipeline stages: `plans/qwen2_5_vl_stages.py`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor

from mmkit.common import IGNORE_INDEX, LossOut
from mmkit.models.qwen2_5_vl.language import packed_causal_attention
from mmkit.parallel.comm import copy_to_group, gather_seq, split_seq
from mmkit.parallel.dims import padded_len
from mmkit.parallel.plans import ParallelPlan
from mmkit.parallel.tp import (
    VocabParallelEmbedding,
    VocabParallelHead,
    apply_tp_rules,
    gather_inputs,
    vocab_parallel_cross_entropy,
)


class Qwen2_5_VLPlan(ParallelPlan):
    """Example: `plan = parallelize(task, dims, mesh, cfg); out = plan(task.prepare(batch))`."""

    loss_split_over_tp = True  # the vocabulary-parallel loss counts each token on one tp rank

    def sp_partial_names(self) -> list[str]:
        return ["language.layers.", "language.norm."]

    def apply_tp(self) -> None:
        """The spec's tp_rules (attention and MLP projections), the vocabulary-parallel embedding and LM
        head the rules mark "vocab", then local head counts and gathered inputs."""
        sp, tp = self.sp, self.tp_mesh
        lang = self.inner.language
        found = apply_tp_rules(self.inner, self.spec.tp_rules, tp, sp)
        assert sorted(found.get("vocab", [])) == ["language.embed_tokens", "language.lm_head"], found
        tied = lang.lm_head.weight is lang.embed_tokens.weight
        lang.embed_tokens = VocabParallelEmbedding(lang.embed_tokens.weight, tp)
        head = (
            lang.embed_tokens.weight if tied else distribute_tensor(lang.lm_head.weight.data, tp, [Shard(0)])
        )
        lang.lm_head = VocabParallelHead(head if isinstance(head, nn.Parameter) else nn.Parameter(head))
        for layer in self.inner.language.layers:
            layer.attn.heads //= self.dims.tp
            layer.attn.kv_heads //= self.dims.tp
            gather_inputs(layer.attn, tp, 7, sp)  # (x, cos, sin, mask, cache, keep, cu_seqlens)
            gather_inputs(layer.mlp, tp, 1, sp)

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks, plus the token embedding and the LM head as units of their own: each is gathered only
        around its use (a 152k-row table is 1.2-5 GB) instead of for the whole step in the root unit. A tied
        matrix belongs to both modules, so it stays in the root."""
        units = super().fsdp_units()
        lang = self.inner.language
        if lang.lm_head.weight is not lang.embed_tokens.weight:
            units += [lang.embed_tokens, lang.lm_head]
        return units

    def _packed_attention(self, q, k, v, cu_seqlens):
        """Causal attention inside each packed sample, over this rank's piece of the row."""
        if self.cp_attn is not None:
            return self.cp_attn.attention(
                q, k, v, causal=True, segment_ids=self._segments, valid_len=self._valid
            )
        return packed_causal_attention(q, k, v, self._cu)

    def _vision_keepalive(self, embeds: torch.Tensor) -> torch.Tensor:
        """Run the vision tower on a 2x2-patch dummy image, weighted 0 (see the module docstring)."""
        v = self.inner.cfg.vision
        m = v.spatial_merge_size
        dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
        grid = torch.tensor([[1, m, m]], device=embeds.device)
        pix = torch.zeros(m * m, dim, device=embeds.device, dtype=embeds.dtype)
        return embeds + 0.0 * self.inner.visual(pix, grid).sum().to(embeds.dtype)

    # ---- the pieces of a sharded forward (also what pipeline stages call, `QwenStage`) ----------------
    def row_meta(self, pos: torch.Tensor, cu: list[int], labels: torch.Tensor | None, dtype) -> dict:
        """Per packed row (1, N): this rank's M-RoPE rows, targets and segment ids, and the state the
        packed-attention kernel reads (sample boundaries; the padding is a segment of its own)."""
        m = self.inner
        cos, sin = m.language.rope(pos, dtype)  # (1, N, Dh)
        N = pos.shape[-1]
        segments = torch.repeat_interleave(
            torch.arange(len(cu) - 1, device=pos.device), torch.tensor(cu, device=pos.device).diff()
        )
        targets = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position i predicts token i + 1
        N_pad = padded_len(N, self.dims.seq_shards)
        if N_pad > N:  # padding: its own segment, no labels
            cos = F.pad(cos, (0, 0, 0, N_pad - N), value=1.0)
            sin = F.pad(sin, (0, 0, 0, N_pad - N))
            segments = F.pad(segments, (0, N_pad - N), value=-1)
            if targets is not None:
                targets = F.pad(targets, (0, N_pad - N), value=IGNORE_INDEX)
        self._segments, self._valid, self._cu = segments, N, list(cu) + ([N_pad] if N_pad > N else [])
        for layer in m.language.layers:
            getattr(layer, "_checkpoint_wrapped_module", layer).attn.packed_attn = self._packed_attention
        meta = {"cos": split_seq(cos, 1, self.cp_group), "sin": split_seq(sin, 1, self.cp_group)}
        seg = split_seq(segments, 0, self.cp_group)
        if targets is not None:
            meta["targets_cp"] = targets = split_seq(targets, 1, self.cp_group)
        if self.sp:
            seg = split_seq(seg, 0, self.tp_group)
            targets = split_seq(targets, 1, self.tp_group) if targets is not None else None
        meta.update(targets=targets, seg=seg, n_loc=meta["cos"].shape[1], samples=len(cu) - 1)
        return meta

    def enter(self, embeds: torch.Tensor) -> torch.Tensor:
        """The embedded row (1, N, D), replicated, -> this rank's piece (padding rows are zeros)."""
        N_pad = padded_len(embeds.shape[1], self.dims.seq_shards)
        if N_pad > embeds.shape[1]:
            embeds = F.pad(embeds, (0, 0, 0, N_pad - embeds.shape[1]))
        x = split_seq(embeds, 1, self.cp_group, backward="local")
        return split_seq(x, 1, self.tp_group, backward="gather") if self.sp else x

    def layers(self, x: torch.Tensor, meta: dict, layers=None) -> torch.Tensor:
        """Decoder layers (default: all) on this rank's piece (the packed-attention kernel set by
        `row_meta` reads the sample boundaries, so the layers see the piece as one segment)."""
        return self.inner.language.decode(x, meta["cos"], meta["sin"], layers, cu_seqlens=[0, meta["n_loc"]])

    def head_loss(self, x: torch.Tensor, meta: dict) -> tuple[torch.Tensor, int]:
        """Final norm and LM head on this rank's supervised positions -> (summed CE, tokens it counts)."""
        m = self.inner
        x = m.language.norm(x)
        targets = meta["targets"]
        if self.tp_group is None:  # the LM head at this rank's supervised positions only
            return self.task.loss_fn(x, targets, m.language.lm_head)
        # vocabulary-parallel head: every tp rank scores all tokens of the cp piece against its vocabulary
        # rows; the loss counts this rank's own tokens (with SP) so it stays partial like the rest
        if self.sp:
            h = gather_seq(x, 1, self.tp_group, backward="reduce_scatter")
        else:
            h = copy_to_group(x, self.tp_group)  # the vocabulary shards' gradients are partial: summed
        n_tp, r_tp = dist.get_world_size(self.tp_group), dist.get_rank(self.tp_group)
        own = torch.arange(h.shape[1], device=h.device) % n_tp == r_tp  # tokens this rank's loss counts
        targets_cp = meta["targets_cp"]
        keep = targets_cp != IGNORE_INDEX  # (1, n) over the cp piece
        head = m.language.lm_head  # this rank's vocabulary rows (V / tp, D)
        ce = vocab_parallel_cross_entropy(
            head(h[keep]), targets_cp[keep], self.tp_group, head.weight.shape[0]
        )
        mine = own[None].expand_as(keep)[keep]
        return ce[mine].sum(), int(mine.sum())

    def embed(self, ids: torch.Tensor, **media) -> torch.Tensor:
        """Token embeddings with vision features at the placeholders (1, N, D); without media the tower
        still runs on a zero-weighted dummy (see the module docstring)."""
        embeds = self.inner.embed(
            ids,
            media.get("pixel_values"),
            media.get("image_grid_thw"),
            media.get("pixel_values_videos"),
            media.get("video_grid_thw"),
        )
        if media.get("pixel_values") is None and media.get("pixel_values_videos") is None:
            embeds = self._vision_keepalive(embeds)
        return embeds

    def forward(self, prep: dict) -> LossOut:
        if "cu_seqlens" not in prep:
            raise ValueError(
                "parallel training of Qwen2.5-VL runs on packed rows: set data.packing=true "
                "(padding is never computed, and context parallelism needs sample boundaries)"
            )
        media = {
            k: prep.get(k)
            for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        }
        embeds = self.embed(prep["input_ids"], **media)  # (1, N, D)
        meta = self.row_meta(prep["position_ids"], prep["cu_seqlens"], prep["labels"], embeds.dtype)
        x = self.layers(self.enter(embeds), meta)
        loss, count = self.head_loss(x, meta)
        return LossOut(loss, count, meta["samples"], int((meta["seg"] >= 0).sum()))
