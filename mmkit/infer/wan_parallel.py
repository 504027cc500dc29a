"""Wan2.1 DiT inference over a sequence-parallel group (Ulysses / ring / hybrid), optionally FSDP2-sharded.

Applied from outside the model through the training plan's sharded forward
(`parallel/plans/wan.py:WanShardedForward`, the model's own stages `embed`, `blocks`, `head_tokens`,
`unpatchify`), in no-grad mode:
  patchify, time / text / CLIP embeddings (replicated: every rank embeds the whole latent)
  -> pad the S tokens to a multiple of the sequence-parallel degree p, keep this rank's S_pad / p
  -> blocks: self-attention over the shards through `ContextParallel` (the training code, padded keys
     masked), cross-attention with local queries against the full text (and CLIP) keys / values, MLP local
  -> head on local tokens, all-gather of the predicted tokens (S_pad x C_out*patch, latent-sized), padding
     dropped, unpatchify: every rank of the group returns the whole prediction (B, C_out, T, H, W).
Hooks installed on the transformer (step caches) see each call as a call of the transformer
(`infer.parallel.SequenceParallelDiT`), with the token shards marked for the ones that reduce over tokens.
Also the VAE decode split in time over ranks (`parallel_decode`). Not here: the CFG split and the process
groups (`infer/parallel.py`), the training plan with its loss (`parallel/plans/wan.py`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmkit.infer.parallel import SequenceParallelDiT
from mmkit.parallel.plans.wan import WanShardedForward


class WanSequenceParallel(WanShardedForward, SequenceParallelDiT):
    """Callable like `WanTransformer` (latents, timestep, text_context, image_context) -> prediction.

    `cp` is the `ContextParallel` of the sequence-parallel group `sp_group` (both None: the plain model).
    The forward is the training plan's (`parallel/plans/wan.py:WanShardedForward`: `trunk`, then
    `head_predict`), with the sequence group as its cp group and no tensor parallelism, called through
    the transformer's hooks (`infer.parallel.SequenceParallelDiT`).
    Example:
        dit = WanSequenceParallel(transformer, layout.cp, layout.sp_group)
        v = dit(latents, t, text_context)  # (B, C_out, T, H, W), equal on every rank of the group
    """

    def sharded(self, latents, timestep, text_context, image_context=None) -> torch.Tensor:
        x, _, temb, grid = self.trunk(latents, timestep, text_context, image_context)
        return self.head_predict(x, temb, grid)


# ---------------------------------------------------------------- VAE decode split in time


def chunk_bounds(frames: int, n: int) -> list[tuple[int, int]]:
    """[start, stop) latent frames of n contiguous chunks as equal as possible (some empty if frames < n)."""
    cuts = [round(i * frames / n) for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


@torch.no_grad()
def decode_chunk(vae, z: torch.Tensor, start: int, stop: int, warmup: int) -> torch.Tensor:
    """Pixels of latent frames [start, stop) of un-normalised latents z (B, C, T, H, W): the Wan VAE's own
    frame-by-frame causal decode, started `warmup` latent frames early (those outputs are dropped) so that
    its causal cache is rebuilt from real frames; exact when the warm-up reaches frame 0. Uses diffusers'
    `AutoencoderKLWan` decoder loop (`decoder`, `_feat_map`, `_conv_idx`, `clear_cache`).
    Example: `px = decode_chunk(pipe.vae, z, 4, 8, warmup=3)  # (B, 3, 16, H*8, W*8)`.
    """
    s = max(0, start - warmup)
    vae.clear_cache()
    x = vae.post_quant_conv(z[:, :, s:stop])
    outs = []
    for i in range(stop - s):
        vae._conv_idx = [0]
        o = vae.decoder(
            x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0
        )
        if s + i >= start:
            outs.append(o)
    vae.clear_cache()
    return torch.cat(outs, dim=2).clamp(-1, 1)


def parallel_decode(vae, z: torch.Tensor, group, warmup: int, scale_t: int) -> torch.Tensor | None:
    """Decode z (B, C, T, H, W) split in time over the ranks of `group`; group rank 0 returns the frames
    (B, 3, 1 + scale_t (T - 1), H', W'), the others None. Chunk j covers latent frames `chunk_bounds(T, n)[j]`.
    Example: `video = parallel_decode(pipe.vae, z, layout.model_group, 3, 4)`.
    """
    n, me = dist.get_world_size(group), dist.get_rank(group)
    bounds = chunk_bounds(z.shape[2], n)
    sizes = [scale_t * (b - a) - (scale_t - 1 if a == 0 and b > a else 0) for a, b in bounds]  # pixel frames
    a, b = bounds[me]
    if b > a:
        mine = decode_chunk(vae, z, a, b, warmup)
    else:  # more ranks than latent frames: nothing to decode, but join the gather
        mine = z.new_zeros(z.shape[0], 3, 0, *_pixel_hw(vae, z))
    pad = max(sizes) - mine.shape[2]
    send = F.pad(mine, (0, 0, 0, 0, 0, pad)).contiguous()  # equal shapes for the gather
    root = dist.get_global_rank(group, 0)
    parts = [torch.empty_like(send) for _ in range(n)] if me == 0 else None
    dist.gather(send, parts, dst=root, group=group)
    if me != 0:
        return None
    return torch.cat([p[:, :, :k] for p, k in zip(parts, sizes)], dim=2)


def _pixel_hw(vae, z: torch.Tensor) -> tuple[int, int]:
    s = vae.config.scale_factor_spatial
    return z.shape[3] * s, z.shape[4] * s
