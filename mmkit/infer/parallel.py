"""Inference over several processes: the layout, its process groups, CFG parallelism, parallel VAE decode.

`InferenceParallel` says how one generation is spread: Ulysses x ring sequence parallelism (the DiT's
tokens cut over `ulysses * ring` ranks, attention through `parallel/sequence.py`), CFG parallelism (the
cond and uncond branches on the two halves of a `cfg = 2` group, one exchange of the prediction per
step), and what saves memory (FSDP2 shards of the DiT / text encoder, text encoder on the CPU, models
moved to the device only for their stage, tiled or rank-parallel VAE decode). Whatever the world size
leaves over (world / (ulysses * ring * cfg)) is data parallelism over prompts.

Rank grid, outermost first: dp x cfg x ring x ulysses, so that Ulysses (the most traffic) sits on
neighbouring ranks, i.e. inside a node. Every rank of a "model group" (cfg x ring x ulysses) holds the
same latents after every step; its rank 0 decodes and writes unless the VAE decode is parallel.

The family's sequence-parallel DiT forward lives beside its pipeline (Wan: `infer/wan_parallel.py`,
OpenSoraPlan: `infer/opensoraplan_parallel.py`), on what they share here (`SequenceParallelDiT`: the call
through the transformer's hooks; `InferenceLayout.shard_weights`: FSDP2 block by block); this file knows
no family.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mmkit.infer.accel.hooks import TokenShards, call_as, token_shards
from mmkit.infer.guidance import cfg_branch, cfg_peers
from mmkit.infer.samplers import cfg_velocity
from mmkit.parallel.dims import process_group_timeout

__all__ = ["InferenceLayout", "InferenceParallel", "SequenceParallelDiT", "peak_memory", "tiled_decode"]


@dataclass
class InferenceParallel:
    """How one generation is spread over processes and memory (all defaults: one process, as before).

    - `ulysses`, `ring`: sequence-parallel degrees (hybrid when both > 1); `ulysses` must divide the heads.
    - `cfg`: 1, or 2 to run the cond and uncond branches on the two halves of the group (guidance > 1).
    - `dit_fsdp`, `t5_fsdp`: FSDP2 shards of the DiT / text-encoder weights over the model group
      (gathered block by block, resharded after each forward).
    - `t5_cpu`: the text encoder stays on the CPU; `offload`: each model is moved to the device only
      for its stage (text encoding, denoising, decoding).
    - `vae_tiling`: decode in overlapping spatial tiles (`vae_tile` latent pixels, overlap a quarter),
      blended; `vae_parallel`: the latent frames split in time over the model group's ranks, each chunk
      decoded after `vae_warmup` earlier latent frames that rebuild the causal cache, gathered on rank 0.
    - `ring_merge`: "gather" (default) keeps the k/v blocks the ring brings and attends once over all
      keys, giving one process's numbers bit for bit (memory: the whole sequence's k/v for a rank's
      heads); "online" merges block by block (less memory, overlaps compute with the transfers,
      differs from one process by float rounding). See `parallel/sequence.py`.

    Example:
        pipe = mmkit.load_pipeline(path, task="t2v", parallel=InferenceParallel(ulysses=2, cfg=2))
    """

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    t5_cpu: bool = False
    offload: bool = False
    vae_tiling: bool = False
    vae_parallel: bool = False
    vae_tile: int = 32  # latent pixels per tile side (256 output pixels with Wan's 8x VAE)
    vae_warmup: int = 3  # latent frames decoded (and dropped) before each time chunk of vae_parallel
    ring_merge: str = "gather"

    @property
    def sp(self) -> int:
        """Sequence-parallel degree (ranks sharing one branch's tokens)."""
        return self.ulysses * self.ring

    @property
    def model_size(self) -> int:
        """Ranks working on one video: ulysses x ring x cfg."""
        return self.sp * self.cfg

    def check(self, world: int, heads: int | None = None, guidance: float | None = None) -> None:
        """Raise ValueError naming the flag and the fix; nothing is loaded yet.

        Example: `InferenceParallel(ulysses=2, cfg=2).check(world=8, heads=12, guidance=5.0)`.
        """
        for flag, v in (("--ulysses-size", self.ulysses), ("--ring-size", self.ring)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{flag} {v}: must be a positive integer (1 = off)")
        if self.cfg not in (1, 2):
            raise ValueError(f"--cfg-size {self.cfg}: must be 1 or 2 (cond and uncond on two halves)")
        if self.cfg == 2 and guidance is not None and guidance <= 1.0:
            raise ValueError(
                f"--cfg-size 2 needs classifier-free guidance, but --guidance is {guidance}; use --guidance > 1 "
                "(e.g. 5.0) or --cfg-size 1"
            )
        if self.t5_cpu and self.t5_fsdp:
            raise ValueError(
                "--t5-cpu with --t5-fsdp: the text encoder either stays whole on the CPU or is sharded"
            )
        if world % self.model_size:
            ok = [n for n in range(1, world + 1) if world % n == 0]
            raise ValueError(
                f"--ulysses-size {self.ulysses} x --ring-size {self.ring} x --cfg-size {self.cfg} = "
                f"{self.model_size} does not divide the world size {world}; choose sizes whose product is "
                f"one of {ok} (the rest of the world becomes data parallelism over --prompts)"
            )
        if heads is not None and heads % self.ulysses:
            ok = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ValueError(
                f"--ulysses-size {self.ulysses}: the model's {heads} attention heads do not divide by it; use "
                f"a Ulysses size in {ok} and put the rest on --ring-size (no head constraint)"
            )
        if (self.dit_fsdp or self.t5_fsdp) and self.model_size == 1:
            raise ValueError(
                "--dit-fsdp / --t5-fsdp shard the weights over the ranks that make one video "
                "(--ulysses-size x --ring-size x --cfg-size), which is 1 here; raise one of those sizes"
            )
        if self.offload and (self.dit_fsdp or self.t5_fsdp):
            raise ValueError("--offload with --dit-fsdp / --t5-fsdp: choose one way to save device memory")
        if self.ring_merge not in ("gather", "online"):
            raise ValueError(
                f"ring_merge={self.ring_merge!r}: choose 'gather' (exact) or 'online' (less memory)"
            )
        if self.vae_warmup < 1:
            raise ValueError(f"vae_warmup={self.vae_warmup}: give at least 1 latent frame")
        if self.vae_tile < 4:
            raise ValueError(f"vae_tile={self.vae_tile}: give at least 4 latent pixels per tile side")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _group(members: list[int], mine: bool):
    """A new process group with the project's timeout, or None for one rank. Every rank calls this for
    every group in the same order (new_group is collective); one-rank groups are skipped on all ranks."""
    if len(members) == 1:
        return None
    g = dist.new_group(members, timeout=process_group_timeout())
    return g if mine else None


class InferenceLayout:
    """The process groups of an `InferenceParallel` inside an initialised process group (or one process).

    rank = ((d * cfg + c) * ring + r) * ulysses + u. Groups of one rank are None.
    Example:
        layout = InferenceLayout(InferenceParallel(ulysses=2))
        layout.cp  # ContextParallel over the Ulysses group, or None
    """

    @staticmethod
    def world_size() -> int:
        """Processes in the default group (1 without one)."""
        return _world()[1]

    def __init__(self, p: InferenceParallel):
        self.p = p
        self.rank, self.world = _world()
        p.check(self.world)
        U, R, C = p.ulysses, p.ring, p.cfg
        self.dp = self.world // p.model_size
        rest, self.ulysses_rank = divmod(self.rank, U)
        rest, self.ring_rank = divmod(rest, R)
        self.dp_rank, self.cfg_rank = divmod(rest, C)
        self.model_rank = self.rank % p.model_size  # rank inside the model group
        self.sp_rank = self.ring_rank * U + self.ulysses_rank
        self.ulysses_group = self.ring_group = self.sp_group = self.cfg_group = self.model_group = None
        if self.world > 1:
            self._build_groups()
        self.cp = None
        if p.sp > 1:
            from mmkit.parallel.sequence import ContextParallel

            self.cp = ContextParallel(self.ulysses_group, self.ring_group, merge=p.ring_merge)

    def _build_groups(self) -> None:
        p, me = self.p, self.rank
        U, R, C, M = p.ulysses, p.ring, p.cfg, p.model_size

        def rank_of(d, c, r, u):
            return ((d * C + c) * R + r) * U + u

        for d in range(self.dp):  # same order on every rank
            model = [rank_of(d, c, r, u) for c in range(C) for r in range(R) for u in range(U)]
            g = _group(model, me in model)
            self.model_group = g if me in model else self.model_group
            for c in range(C):
                sp = [rank_of(d, c, r, u) for r in range(R) for u in range(U)]
                g = _group(sp, me in sp)
                self.sp_group = g if me in sp else self.sp_group
                for r in range(R):
                    uly = [rank_of(d, c, r, u) for u in range(U)]
                    g = _group(uly, me in uly)
                    self.ulysses_group = g if me in uly else self.ulysses_group
                for u in range(U):
                    ring = [rank_of(d, c, r, u) for r in range(R)]
                    g = _group(ring, me in ring)
                    self.ring_group = g if me in ring else self.ring_group
            for r in range(R):
                for u in range(U):
                    pair = [rank_of(d, c, r, u) for c in range(C)]
                    g = _group(pair, me in pair)
                    self.cfg_group = g if me in pair else self.cfg_group
        assert M == 1 or self.model_group is not None

    # ---- what each rank does ------------------------------------------------------------------
    @property
    def writes(self) -> bool:
        """Whether this rank decodes (unless the VAE is parallel) and writes its model group's videos."""
        return self.model_rank == 0

    @property
    def shows_progress(self) -> bool:
        return self.rank == 0

    @property
    def branch(self) -> str:
        """The CFG branch this rank computes under CFG parallelism."""
        return "cond" if self.cfg_rank == 0 else "uncond"

    def my_prompts(self, n: int) -> list[int]:
        """Indices of the prompts (of n) this rank's model group generates: round-robin over dp."""
        return list(range(self.dp_rank, n, self.dp))

    def fsdp_mesh(self, device: torch.device):
        """A 1-D DeviceMesh over the model group (FSDP2 shards the weights over it)."""
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(self.model_group, device.type)

    def shard_weights(self, root: nn.Module, blocks, device: torch.device) -> nn.Module:
        """FSDP2 over the model group: one unit per module of `blocks`, then `root` (what the blocks leave:
        embeddings, head), all resharded after forward, so a rank holds 1/n of the weights plus one
        gathered block at a time. Returns `root`, sharded in place.
        Example: `layout.shard_weights(t5, t5.encoder.block, torch.device("cuda"))`.
        """
        from torch.distributed.fsdp import fully_shard

        mesh = self.fsdp_mesh(device)
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(root, mesh=mesh, reshard_after_forward=True)
        return root

    def velocity(self, model, guidance: float, cond: dict, uncond: dict | None):
        """`fn(x, t)` with classifier-free guidance; under CFG parallelism each half of the cfg group runs
        one branch and the two predictions are exchanged once (one all-gather of a latent-sized tensor).

        The combination is the same expression as `samplers.cfg_velocity` on the same two tensors, so the
        result equals one process bit for bit given equal branch predictions.
        Example: `v = layout.velocity(dit, 5.0, cond, uncond)(x, t)`.
        """
        if self.p.cfg == 1 or uncond is None:
            return cfg_velocity(model, guidance, cond, uncond)
        kwargs = cond if self.branch == "cond" else uncond
        cond_rank = self.rank - self.cfg_rank * self.p.sp  # this rank's peer in the cond half (or itself)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with cfg_branch(self.branch), cfg_peers(self.cfg_group, cond_rank):
                v = model(x, t, **kwargs).contiguous()
            parts = [torch.empty_like(v) for _ in range(2)]
            dist.all_gather(parts, v, group=self.cfg_group)  # [cond, uncond]: cfg rank 0 holds cond
            v_c, v_u = parts
            return v_u + guidance * (v_c - v_u)

        return fn

    def video_counts(self, counts: list[int], device: torch.device | str = "cpu") -> list[int]:
        """Per-rank counts of one video's work (e.g. DiT block evaluations run / skipped) -> the video's:
        summed over the CFG halves (each ran one branch); the ranks of a sequence group each count every
        block once already. Equal on every rank of the model group.
        `device`: where the backend reduces (the pipeline's device; CPU for gloo).
        Example: `run, skipped = layout.video_counts([stats.blocks_run, stats.blocks_skipped], pipe.device)`.
        """
        if self.cfg_group is None:
            return list(counts)
        t = torch.tensor(counts, dtype=torch.int64, device=device)
        dist.all_reduce(t, group=self.cfg_group)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class SequenceParallelDiT(nn.Module):
    """What the families' sequence-parallel DiT wrappers share; a family's wrapper is
    `class XSequenceParallel(XShardedForward, SequenceParallelDiT)` (its training plan's sharded forward
    first, for `trunk`, `_local_tokens`, `head_predict`) and gives `sharded(latents, timestep, ...)`.

    Callable like the transformer, `(latents, timestep, *conditions)` -> prediction (B, C_out, T, H, W),
    equal on every rank of the sequence group. `cp` is the `ContextParallel` of the sequence-parallel
    group `sp_group`; both None: the plain model, still a module of its own so FSDP2 can wrap it as the
    root unit. Under sequence parallelism the hooks on the transformer (step caches) see the call as a
    call of the transformer (`accel.hooks.call_as`), with this rank's real tokens marked for the ones
    that reduce over tokens (`token_shards`).
    Example: `dit = WanSequenceParallel(transformer, layout.cp, layout.sp_group); v = dit(x, t, ctx)`.
    """

    def __init__(self, transformer: nn.Module, cp=None, sp_group=None):
        super().__init__()
        self.inner = transformer
        self.cp_attn, self.cp_group = cp, sp_group
        self.tp_group, self.sp = None, False  # no tensor parallelism in inference
        self.seq_shards = cp.size if cp is not None else 1
        if cp is not None:
            heads = transformer.cfg.num_attention_heads
            cp.check_heads(heads, heads)

    @classmethod
    def parallelize(cls, transformer: nn.Module, layout: InferenceLayout, device: torch.device):
        """The DiT as the layout's sequence-parallel module, FSDP2-sharded over the model group with
        `--dit-fsdp` (`InferenceLayout.shard_weights`: each block, then this wrapper with the embeddings
        and head).
        Example: `dit = WanSequenceParallel.parallelize(pipe.transformer, layout, torch.device("cuda"))`.
        """
        dit = cls(transformer, layout.cp, layout.sp_group)
        if layout.p.dit_fsdp:
            layout.shard_weights(dit, transformer.blocks, device)
        return dit

    @property
    def cfg(self):
        return self.inner.cfg

    def forward(self, latents: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.cp_attn is None:
            return self.inner(latents, *args, **kwargs)
        S = math.prod(self.inner.grid(latents))  # tokens of the whole latent
        valid = self._local_tokens(torch.ones(S, dtype=torch.bool, device=latents.device))  # (S_pad / p,)
        with token_shards(TokenShards(self.cp_group, valid)):
            return call_as(self.inner, self.sharded, latents, *args, **kwargs)

    def sharded(self, latents: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The prediction from this rank's token shard (the family's `trunk`, then `head_predict`)."""
        raise NotImplementedError


def check_same_everywhere(ok: bool, message: str) -> None:
    """Raise ValueError on every rank when `ok` is False on any rank, naming the ranks (a collective).

    Example: `check_same_everywhere(Path(img).is_file(), f"--image {img}: file not found")`.
    """
    rank, world = _world()
    if world == 1:
        if not ok:
            raise ValueError(message)
        return
    flags = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(flags, torch.tensor([float(ok)]))
    bad = [r for r, f in enumerate(flags) if f.item() == 0]
    if bad:
        raise ValueError(f"{message} (on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))})")


def peak_memory(device: torch.device) -> str:
    """This process's peak memory: the device allocator's peak on CUDA, the resident set on the CPU.

    Example: `print(f"rank 0: peak memory {peak_memory(torch.device('cuda'))}")`.
    """
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    return f"{rss:.2f} GiB resident (CPU)"


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device, active: bool):
    """With `active`, move `module` to `device` for the block and back to the CPU after (offload)."""
    if not active:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- tiled / parallel VAE decode


def _starts(n: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every `stride`, the last tile flush with the end (all tiles full)."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride)) + [n - tile]
    return sorted(set(starts))


def _ramp(n_px: int, lo: int, hi: int, has_lo: bool, has_hi: bool) -> torch.Tensor:
    """1-D blend weight (n_px,) of one tile: linear ramps over the `lo` / `hi` overlap pixels at the sides
    that border another tile, 1 elsewhere (never 0, so every pixel has weight)."""
    w = torch.ones(n_px)
    if has_lo and lo:
        w[:lo] = (torch.arange(lo) + 0.5) / lo
    if has_hi and hi:
        w[n_px - hi :] = torch.minimum(w[n_px - hi :], (torch.arange(hi).flip(0) + 0.5) / hi)
    return w


def tiled_decode(decode, z: torch.Tensor, scale: int, tile: int, frames: int) -> torch.Tensor:
    """Decode latents (B, C, T, H, W) in overlapping spatial tiles of `tile` latent pixels, blended.

    `decode(z_tile)` -> pixels (B, 3, frames, H_tile*scale, W_tile*scale). Tiles overlap by tile // 4 latent
    pixels and blend with linear ramps over the overlap (weights normalised per pixel). Each tile sees only
    its own latents (Wan's VAE also attends over the whole frame in its middle block), so the result differs
    from an untiled decode (see docs/inference.md for the measured error).
    Example: `video = tiled_decode(lambda z: vae.decode(z).sample, latents, 8, 32, frames=81)`.
    """
    B, _, _, H, W = z.shape
    overlap = tile // 4
    stride = tile - overlap
    hs, ws = _starts(H, tile, stride), _starts(W, tile, stride)
    tiles = [(i, j) for i in hs for j in ws]
    num = torch.zeros(B, 3, frames, H * scale, W * scale, device=z.device)
    den = torch.zeros(H * scale, W * scale)
    for i, j in tiles:
        th, tw = min(tile, H - i), min(tile, W - j)
        px = decode(z[:, :, :, i : i + th, j : j + tw]).float()  # (B, 3, frames, th*s, tw*s)
        # blend weight of this tile: ramps where a neighbouring tile overlaps it
        lo_h = hi_h = lo_w = hi_w = 0
        if i > 0:
            lo_h = (max(x for x in hs if x < i) + tile - i) * scale
        if i + th < H:
            hi_h = (i + th - min(x for x in hs if x > i)) * scale
        if j > 0:
            lo_w = (max(x for x in ws if x < j) + tile - j) * scale
        if j + tw < W:
            hi_w = (j + tw - min(x for x in ws if x > j)) * scale
        wh = _ramp(th * scale, lo_h, hi_h, i > 0, i + th < H)
        ww = _ramp(tw * scale, lo_w, hi_w, j > 0, j + tw < W)
        w2 = wh[:, None] * ww[None, :]  # (th*s, tw*s)
        rows, cols = slice(i * scale, (i + th) * scale), slice(j * scale, (j + tw) * scale)
        den[rows, cols] += w2
        num[..., rows, cols] += px * w2.to(px.device)
    return num / den.to(num.device)


def rank_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment (1 process without it)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )
