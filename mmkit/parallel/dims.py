"""Process layout: the sizes of every parallel dimension, their checks against a model, and the mesh.

A run's processes form a grid `pp x dp_replicate x dp_shard x cp x tp` (outermost first, so that the
dimensions that talk most, tp then cp, sit on neighbouring ranks, i.e. inside a node). The grid becomes
a `DeviceMesh` with those dimension names plus flattened views the plans use:
- "dp"          = dp_replicate x dp_shard: processes that read different data;
- "dp_shard_cp" = dp_shard x cp: the FSDP2 shard group (context-parallel ranks hold different tokens of
  the same samples, so their gradients are partial sums, exactly like data-parallel ranks);
- "dp_cp"       = dp_replicate x dp_shard x cp: every process whose gradients are summed.
Hybrid context parallelism splits "cp" further into ("cp_ring", "cp_ulysses"), Ulysses innermost.

`check_model_layout` holds every rule a layout must satisfy for a given model (used by training and by
`mmkit convert`); it raises `LayoutError` naming the field, the value and the fix, before any compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from mmkit import registry
from mmkit.registry import ModelShape


class LayoutError(ValueError):
    """An impossible parallel layout for this model or world size."""


def model_shape(family: str, model_cfg) -> ModelShape:
    """The layout-relevant numbers of a model config, from the family's registry entry.

    Example: `model_shape("wan", FLAVORS["14B"])` -> `ModelShape("wan", 40, 40, 40)`.
    """
    try:
        spec = registry.get(family)
    except ValueError as e:
        raise LayoutError(str(e)) from None
    return spec.model_shape(model_cfg)


def _even_split(pp: int, layers: int) -> list[int]:
    """`layers` over `pp` stages, the last stages taking the remainder: `_even_split(3, 8)` -> `[2, 3, 3]`."""
    base, extra = divmod(layers, pp)
    return [base + (1 if i >= pp - extra else 0) for i in range(pp)]


def stage_layers(pp: int, layers: int, pp_layers=None, field: str = "parallel.pp_layers") -> list[int]:
    """Layers per pipeline stage, in stage order (with virtual stages: chunk-major, i.e. rank 0's first
    chunk, rank 1's first chunk, ..., then everyone's second chunk).

    `pp_layers` is None (even split, the last stages take the remainder), a flat list with one entry
    per stage (`[12, 16]`), or nested lists `[[a, b], [c, d]]` = chunks per virtual round (MindSpeed's
    notation; `[[12, 16]]` is the same as `[12, 16]`).
    Example: `stage_layers(2, 28, [[6, 8], [7, 7]])` -> `[6, 8, 7, 7]`.
    """
    if pp > layers:
        raise LayoutError(
            f"parallel.pp={pp} stages but the model has {layers} layers: every stage needs at least one; "
            f"use at most {layers} stages"
        )
    if pp_layers is None:  # the last stages take the remainder (stage 0 also holds the embeddings)
        counts = _even_split(pp, layers)
    elif all(isinstance(x, (list, tuple)) for x in pp_layers) and pp_layers:
        rounds = [list(r) for r in pp_layers]
        bad = [r for r in rounds if len(r) != pp]
        if bad:
            raise LayoutError(
                f"{field}={pp_layers}: every inner list needs one entry per pipeline stage (parallel.pp={pp}); "
                f"got {[len(r) for r in rounds]}. Example for pp={pp}: {[_even_split(pp, layers)]}"
            )
        counts = [int(x) for r in rounds for x in r]
    elif all(isinstance(x, int) for x in pp_layers):
        counts = [int(x) for x in pp_layers]
        if len(counts) != pp:
            raise LayoutError(
                f"{field}={pp_layers}: {len(counts)} entries but parallel.pp={pp}; give one layer count per "
                f"stage (e.g. {_even_split(pp, layers)}) or nested lists for virtual stages"
            )
    else:
        raise LayoutError(
            f"{field}={pp_layers}: give a list of ints ([12, 16]) or of lists ([[6, 8], [7, 7]])"
        )
    if sum(counts) != layers:
        raise LayoutError(
            f"{field}={pp_layers}: the stages hold {sum(counts)} layers but the model has {layers}; "
            "make the counts sum to the model's layer count"
        )
    empty = [i for i, c in enumerate(counts) if c < 1]
    if empty:
        raise LayoutError(
            f"{field}={pp_layers}: stage {empty[0]} has no layers; every pipeline stage needs at least one "
            f"layer (use fewer stages: at most {layers})"
        )
    return counts


def check_model_layout(
    family: str,
    model_cfg,
    *,
    tp: int = 1,
    cp: int = 1,
    cp_algo: str = "ulysses",
    ulysses_degree: int | None = None,
    pp: int = 1,
    pp_layers=None,
    vit_pp_layers=None,
) -> ModelShape:
    """Raise `LayoutError` if the layout cannot run this model; returns the model's `ModelShape`.

    Rules: tp <= KV heads and heads divisible by tp (each rank holds whole heads); Ulysses context
    parallelism splits heads further, so heads and KV heads divide tp x ulysses degree; pipeline stages
    hold at least one layer each and the counts sum to the model's layers; the Qwen2.5-VL vision tower
    sits on stage 0.
    Example: `check_model_layout("wan", FLAVORS["1.3B"], tp=2, cp=2, cp_algo="ulysses")`.
    """
    shape = model_shape(family, model_cfg)
    if tp > shape.kv_heads:
        raise LayoutError(
            f"parallel.tp={tp}: larger than the model's {shape.kv_heads} key/value heads; use tp <= "
            f"{shape.kv_heads} (and add data or context parallelism instead)"
        )
    for what, n in (("attention heads", shape.heads), ("key/value heads", shape.kv_heads)):
        if n % tp:
            ok = [d for d in range(1, n + 1) if n % d == 0]
            raise LayoutError(f"parallel.tp={tp}: the model's {n} {what} do not divide by tp; use tp in {ok}")
    uly = {"ulysses": cp, "hybrid": ulysses_degree or 1, "ring": 1}.get(cp_algo, 1)
    if uly > 1:
        for what, n in (("attention heads", shape.heads), ("key/value heads", shape.kv_heads)):
            if n % (tp * uly):
                field = "parallel.cp" if cp_algo == "ulysses" else "parallel.ulysses_degree"
                raise LayoutError(
                    f"{field}={uly}: Ulysses splits heads, and the model's {n} {what} do not divide by "
                    f"tp x ulysses = {tp} x {uly}; use cp_algo='ring' (no head constraint), a hybrid with a "
                    f"smaller ulysses_degree, or a degree dividing {n // tp}"
                )
    if pp > 1 or pp_layers is not None:
        stage_layers(pp, shape.layers, pp_layers)
    if vit_pp_layers is not None and shape.vision_layers:
        flat = [int(x) for r in vit_pp_layers for x in (r if isinstance(r, (list, tuple)) else [r])]
        if sum(flat) != shape.vision_layers or any(flat[1:]):
            raise LayoutError(
                f"vit_pp_layers={vit_pp_layers}: the vision tower ({shape.vision_layers} blocks) sits whole on "
                f"pipeline stage 0; use [[{shape.vision_layers}{', 0' * (max(len(flat), 1) - 1)}]]"
            )
    return shape


@dataclass
class ParallelDims:
    """Sizes of every parallel dimension; `build_mesh` makes the DeviceMesh.

    Example:
        dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=2, tp=1, pp=1, world_size=4)
        mesh = dims.build_mesh("cpu")     # under torchrun with 4 processes
        mesh["dp_shard_cp"].size()        # 4
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    world_size: int = 1
    cp_algo: str = "ulysses"
    ulysses_degree: int | None = None
    ring_window: int | None = None
    sequence_parallel: bool = True

    @classmethod
    def from_config(cls, p, world_size: int) -> ParallelDims:
        """From a validated `ParallelConfig` (dp_shard resolved). Example: `ParallelDims.from_config(cfg.parallel, 4)`."""
        dims = cls(
            p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, world_size, p.cp_algo, p.ulysses_degree,
            p.ring_window, bool(p.sequence_parallel),
        )  # fmt: skip
        dims.check()
        return dims

    def check(self) -> None:
        prod = self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp
        if prod != self.world_size:
            raise LayoutError(
                f"parallel: dp_replicate({self.dp_replicate}) x dp_shard({self.dp_shard}) x cp({self.cp}) x "
                f"tp({self.tp}) x pp({self.pp}) = {prod} != world size {self.world_size}"
            )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def ulysses(self) -> int:
        """Ulysses group size inside cp (cp for 'ulysses', 1 for 'ring', ulysses_degree for 'hybrid')."""
        return {"ulysses": self.cp, "ring": 1, "hybrid": self.ulysses_degree or 1}[self.cp_algo]

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 wraps the model: any dimension whose gradients are summed (dp or cp)."""
        return self.dp * self.cp > 1

    @property
    def seq_shards(self) -> int:
        """How many pieces the DiT/LLM sequence is cut into between blocks (cp, x tp with sequence parallel)."""
        return self.cp * (self.tp if self.tp > 1 and self.sequence_parallel else 1)

    def build_mesh(self, device_type: str):
        """The DeviceMesh over all processes, with the flattened views described in the module docstring."""
        from torch.distributed.device_mesh import init_device_mesh

        names = ["pp", "dp_replicate", "dp_shard", "cp_ring", "cp_ulysses", "tp"]
        ring = self.cp // self.ulysses
        sizes = [self.pp, self.dp_replicate, self.dp_shard, ring, self.ulysses, self.tp]
        mesh = init_device_mesh(device_type, tuple(sizes), mesh_dim_names=tuple(names))
        mesh["cp_ring", "cp_ulysses"]._flatten("cp")
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp_ring", "cp_ulysses"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard", "cp_ring", "cp_ulysses"]._flatten("dp_cp")
        return mesh


def process_group_timeout() -> timedelta:
    """The timeout every process group gets, so a hang fails fast (MMKIT_PG_TIMEOUT_S, default 600 s)."""
    import os

    return timedelta(seconds=float(os.environ.get("MMKIT_PG_TIMEOUT_S", "600")))


def padded_len(n: int, shards: int) -> int:
    """`n` rounded up to a multiple of `shards` (sequences are padded, never rejected). Example: 13, 4 -> 16."""
    return math.ceil(n / shards) * shards


__all__ = [
    "LayoutError",
    "ModelShape",
    "ParallelDims",
    "check_model_layout",
    "model_shape",
    "padded_len",
    "process_group_timeout",
    "stage_layers",
]
