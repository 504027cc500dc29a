"""OpenSoraPlan 1.3 DiT inference over a sequence-parallel group (Ulysses / ring / hybrid), optionally
FSDP2-sharded, and the layout rules this family adds (checked before any weights load).

Applied from outside the model through the training plan's sharded forward
(`parallel/plans/opensoraplan.py:OpenSoraPlanShardedForward`, the model's own stages `embed`, `biases`,
`blocks`, `head_tokens`, `unpatchify`), in no-grad mode:
  patch / time / caption embeddings (replicated: every rank embeds the whole latent)
  -> pad the S tokens to a multiple of k^2 x p (Skiparse k = sparse_n, p = ulysses x ring), keep this
     rank's S_pad / p
  -> blocks: dense self-attention over the shards through `ContextParallel` (padded keys masked);
     Skiparse layers: one all-to-all hands each rank whole Skiparse groups (k / gcd(p, k) of them, with
     a share of the heads when p does not divide k), the groups attend locally, a second all-to-all
     returns the tokens (the training design, docs/parallel.md);
     cross-attention with local queries against the full caption, MLP local
  -> head on local tokens, all-gather (S_pad x C_out*4, latent-sized), padding dropped, unpatchified:
     every rank of the group returns the whole prediction (B, C_out, T, H, W).
Hooks installed on the transformer (step caches) see each call as a call of the transformer
(`infer.parallel.SequenceParallelDiT`), with the token shards marked for the ones that reduce over tokens.
Not here: the CFG split and the process groups (`infer/parallel.py`), the pipeline (`infer/opensoraplan.py`).
"""

from __future__ import annotations

import torch

from mmkit.infer.parallel import SequenceParallelDiT
from mmkit.parallel.plans.opensoraplan import OpenSoraPlanShardedForward, check_skiparse_shards


class OpenSoraPlanSequenceParallel(OpenSoraPlanShardedForward, SequenceParallelDiT):
    """Callable like `OpenSoraPlanTransformer` (latents, timestep, caption, video_mask, caption_mask) ->
    prediction (B, C_out, T, H, W), equal on every rank of the sequence group.

    `cp` is the `ContextParallel` of the sequence-parallel group `sp_group` (both None: the plain model),
    called through the transformer's hooks (`infer.parallel.SequenceParallelDiT`). Every latent pixel
    must be real (`video_mask` None or all ones, as the pipeline gives).
    Example:
        dit = OpenSoraPlanSequenceParallel(transformer, layout.cp, layout.sp_group)
        v = dit(latents, t, caption, None, caption_mask)
    """

    def __init__(self, transformer, cp=None, sp_group=None):
        super().__init__(transformer, cp, sp_group)
        if cp is not None:
            heads = transformer.cfg.num_attention_heads
            check_skiparse_shards(transformer.cfg, cp.size, heads, f"sequence-parallel degree {cp.size}")

    def forward(self, latents, timestep, caption, video_mask=None, caption_mask=None) -> torch.Tensor:
        if self.cp_attn is not None and video_mask is not None and not bool(video_mask.bool().all()):
            raise ValueError(
                "video_mask: padded latents are not supported under sequence parallelism; every latent "
                "pixel must be real (the pipeline's case)"
            )
        return super().forward(latents, timestep, caption, video_mask, caption_mask)

    def sharded(self, latents, timestep, caption, video_mask=None, caption_mask=None) -> torch.Tensor:
        x, temb, grid = self.trunk(latents, timestep, caption, caption_mask)
        return self.head_predict(x, temb, grid)


def check_parallel(folder, parallel, world: int) -> None:
    """The layout rules of an OpenSoraPlan folder, from its configs only (nothing loads): the generic ones
    (`InferenceParallel.check` with the DiT's heads) and Skiparse's (`check_skiparse_shards`: the heads
    divide by ulysses x ring / gcd(ulysses x ring, sparse_n));
    `--vae-parallel` and `--vae-tiling` are refused (the WF-VAE always decodes in causal time chunks on
    one rank, equal to an untiled decode). Raises ValueError naming the flag and the fix.

    Example: `check_parallel("osp-tiny", InferenceParallel(ulysses=2), world=2)`.
    """
    from pathlib import Path

    from mmkit.models.common.hf_io import read_json
    from mmkit.models.opensoraplan.config import OSPConfig

    cfg_json = Path(folder) / "transformer" / "config.json"
    cfg = OSPConfig.from_dict(read_json(cfg_json, "OpenSoraPlan DiT config")) if cfg_json.is_file() else None
    parallel.check(world, heads=None if cfg is None else cfg.num_attention_heads)
    for flag, on in (("--vae-parallel", parallel.vae_parallel), ("--vae-tiling", parallel.vae_tiling)):
        if on:
            raise ValueError(
                f"{flag}: not available for OpenSoraPlan; its WF-VAE always decodes 4 latent frames at a time "
                f"with a causal cache (equal to an untiled decode, memory bounded by the chunk) on one rank; "
                f"drop {flag}"
            )
    if cfg is not None and parallel.sp > 1:
        what = f"--ulysses-size {parallel.ulysses} x --ring-size {parallel.ring} = {parallel.sp}"
        check_skiparse_shards(cfg, parallel.sp, cfg.num_attention_heads, what)
