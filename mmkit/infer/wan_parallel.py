"""Wan2.1 DiT inference over a sequence-parallel group (Ulysses / ring / hybrid), optionally FSDP2-sharded.

Applied from outside the model, composed of its own stages (`embed`, `blocks`, `head_tokens`,
`unpatchify`), in no-grad mode:
  patchify, time / text / CLIP embeddings (replicated: every rank embeds the whole latent)
  -> pad the S tokens to a multiple of the sequence-parallel degree p, keep this rank's S_pad / p
  -> blocks: self-attention over the shards through `ContextParallel` (the training code, padded keys
     masked), cross-attention with local queries against the full text (and CLIP) keys / values, MLP local
  -> head on local tokens, all-gather of the predicted tokens (S_pad x C_out*patch, latent-sized), padding
     dropped, unpatchify: every rank of the group returns the whole prediction (B, C_out, T, H, W).
Not here: the CFG split and the process groups (`infer/parallel.py`), the training plan with its loss
(`parallel/plans/wan.py`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmkit.models.wan.model import WanTransformer
from mmkit.parallel.dims import padded_len


class WanSequenceParallel(nn.Module):
    """Callable like `WanTransformer` (latents, timestep, text_context, image_context) -> prediction.

    `cp` is the `ContextParallel` of the sequence-parallel group `sp_group` (both None: the plain model,
    still a module of its own so FSDP2 can wrap it as the root unit).
    Example:
        dit = WanSequenceParallel(transformer, layout.cp, layout.sp_group)
        v = dit(latents, t, text_context)  # (B, C_out, T, H, W), equal on every rank of the group
    """

    def __init__(self, transformer: WanTransformer, cp=None, sp_group=None):
        super().__init__()
        self.inner = transformer
        self.cp, self.sp_group = cp, sp_group
        self.size = cp.size if cp is not None else 1
        self.rank = cp.rank if cp is not None else 0
        self._valid = 0
        if cp is not None:
            cp.check_heads(transformer.cfg.num_attention_heads, transformer.cfg.num_attention_heads)
            for block in transformer.blocks:
                block.attn.attn_fn = self._self_attention

    @property
    def cfg(self):
        return self.inner.cfg

    def _self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, S_pad/p, Dh) shards -> this rank's shard of attention over the S real tokens."""
        return self.cp.attention(q, k, v, valid_len=self._valid)

    def _local(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Pad `dim` to a multiple of p (zeros) and keep this rank's contiguous piece."""
        pad = padded_len(t.shape[dim], self.size) - t.shape[dim]
        if pad:
            t = F.pad(t, (0, 0) * (t.ndim - 1 - dim) + (0, pad))
        return t.chunk(self.size, dim=dim)[self.rank]

    def forward(self, latents, timestep, text_context, image_context=None) -> torch.Tensor:
        m = self.inner
        if self.cp is None:
            return m(latents, timestep, text_context, image_context)
        m.check_input(latents, image_context)
        grid = m.grid(latents)
        x, temb, e, ctx, ctx_img = m.embed(latents, timestep, text_context, image_context)
        S = x.shape[1]
        self._valid = S
        cos, sin = m.rope(grid, latents.device, x.dtype)  # (S, Dh)
        # padded rows: the identity rotation (their keys are masked, their outputs dropped)
        rope = (self._local(F.pad(cos, (0, 0, 0, padded_len(S, self.size) - S), value=1.0), 0),
                self._local(sin, 0))  # fmt: skip
        x = self._local(x, 1)  # (B, S_pad/p, D)
        for block in m.blocks:
            x = block(x, e, ctx, ctx_img, rope)
        y = m.head_tokens(x, temb).contiguous()  # (B, S_pad/p, C_out * patch)
        parts = [torch.empty_like(y) for _ in range(self.size)]
        dist.all_gather(parts, y, group=self.sp_group)  # sp group rank j holds tokens [j*S_loc, (j+1)*S_loc)
        y = torch.cat(parts, dim=1)[:, :S]
        return m.unpatchify(y, grid).float()


def parallelize_wan_dit(transformer: WanTransformer, layout, device: torch.device) -> WanSequenceParallel:
    """The DiT as the layout's sequence-parallel module, FSDP2-sharded over the model group when asked.

    FSDP2: one unit per block and the wrapper as the root (patch / time / text embeddings and head), all
    resharded after forward, so a rank holds 1/n of the weights plus one gathered block at a time.
    Example: `dit = parallelize_wan_dit(pipe.transformer, layout, torch.device("cuda"))`.
    """
    dit = WanSequenceParallel(transformer, layout.cp, layout.sp_group)
    if layout.p.dit_fsdp:
        from torch.distributed.fsdp import fully_shard

        mesh = layout.fsdp_mesh(device)
        for block in transformer.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(dit, mesh=mesh, reshard_after_forward=True)
    return dit
