"""Qwen2.5-VL pipeline stages (`pp_stages.split_stages` builds them, `pp.Pipeline` runs them).

What each stage holds (every stage holds at least one decoder layer): stage 0 the whole vision tower and
`language.embed_tokens`, the last stage `language.norm` and `language.lm_head` (with tied embeddings that
is the embedding matrix again: `tied_weight`, whose two gradients the pipeline sums).

Stage forward contract, packed rows (1, S) with `cu_seqlens`: stage 0 takes input_ids (1, S) (+ media
keywords); stages pass hidden (1, S, D); the last returns the final-normed hidden, or the summed
next-token cross-entropy when given `labels`. Keywords `position_ids` (3, 1, S) and `cu_seqlens` (list
of ints) go to every stage. Rows are padded to one length per step (`QwenStage.prepare`): the padding is
a segment of its own with -100 labels (attention never crosses segments, so it never changes a real
token's result). Vision inputs (any size, or none) are consumed on stage 0 only.
"""

from __future__ import annotations

import torch
from torch import nn

from mmkit.common import IGNORE_INDEX
from mmkit.models.qwen2_5_vl.model import check_placeholders
from mmkit.parallel.pp_stages import Stage

_MEDIA = (("pixel_values", "image_grid_thw", "image"), ("pixel_values_videos", "video_grid_thw", "video"))


class QwenStage(Stage):
    """Consecutive decoder layers of a `Qwen2_5_VLModel` (+ vision tower and token embedding on stage 0,
    final norm and LM head on the last stage), for packed rows (1, S) with `cu_seqlens`.

    Example (one process, stages chained by hand):
        s0, s1 = (QwenStage(model, i, 2, ids) for i, ids in enumerate([[0], [1]]))
        kw = dict(position_ids=pos, cu_seqlens=[0, 7, 12])
        hidden = s1(s0(ids, **kw), **kw)  # == model(ids, position_ids=pos, cu_seqlens=..., return_hidden=True)
    """

    def __init__(
        self, model: nn.Module, stage_index: int, num_stages: int, layer_ids: list[int], plan=None, loss=None
    ):
        super().__init__(model, stage_index, num_stages, layer_ids, plan, loss)
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

    @staticmethod
    def num_layers(model: nn.Module) -> int:
        return len(model.language.layers)

    @staticmethod
    def tied_weight(model: nn.Module) -> nn.Parameter | None:
        """The token embedding, when the LM head reuses it (`tie_word_embeddings`)."""
        return model.language.embed_tokens.weight if model.cfg.tie_word_embeddings else None

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
        x = self.full_model.language.decode(x, cos, sin, lang.layers.values(), cu_seqlens=cu_seqlens)
        if not self.is_last:
            return x
        x = lang.norm(x)
        if labels is None:
            return x
        # position i predicts token i + 1; the LM head runs at supervised positions only
        return self.loss_fn(x[:, :-1], labels[:, 1:], lang.lm_head)[0]

    @staticmethod
    def _check_media(model: nn.Module, i: int, ids: torch.Tensor, mb: dict) -> None:
        cfg = model.cfg
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

    @staticmethod
    def prepare(model: nn.Module, mbs: list[dict], device, seq_len: int | None = None):
        """Check a step's packed rows and pad them to one length: `seq_len`, or None = the step's longest
        row rounded up to a multiple of 64 (a new length rebuilds the schedule once)."""
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
            QwenStage._check_media(model, i, ids, mb)
            rows.append((ids, cu))
        longest = max(ids.shape[1] for ids, _ in rows)
        S = seq_len or -(-longest // 64) * 64
        if longest > S:
            worst = max(range(len(rows)), key=lambda j: rows[j][0].shape[1])
            raise ValueError(
                f"micro_batches[{worst}]: packed row of {longest} tokens exceeds seq_len={S}; raise seq_len "
                "or pack fewer tokens per micro-batch"
            )
        pad_id = model.cfg.pad_token_id or 0
        dev = device
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
