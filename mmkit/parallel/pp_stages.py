"""Pipeline stages: a single-device model cut into consecutive pieces, one `nn.Module` per stage.

A stage holds REFERENCES to the model's own submodules under the model's attribute paths (layers in
an `nn.ModuleDict` keyed by their original index), so `stage.state_dict()` keys are exactly the full
model's names ("blocks.3.attn.q.weight", "language.layers.5.mlp.up_proj.weight") and a distributed
checkpoint reshards freely between pipeline layouts. The model itself is never edited.

This file holds what every family shares: the layer split (`plan_layers`), the `Stage` base class and
`split_stages`, which finds the family's stage class through the registry (`FamilySpec.stages`). Each
family's stage class lives next to its plan (`plans/wan_stages.py`, `plans/qwen2_5_vl_stages.py`) and
says what its stages hold, what they exchange, how a step's micro-batches are checked and laid out
(`prepare`), and which weight, if any, the first and last stage share (`tied_weight`).
With a parallel plan (`parallel/plans/`, tensor / context parallelism inside the stages), every stage
calls the plan's pieces: stage 0 embeds and cuts the sequence (`plan.enter`), every stage runs its layers
on this rank's piece, and the last stage returns `plan.head_loss` (partial over the sequence shards, like
the plan's own forward). Without a plan the last stage's loss is the family's training loss from the
registry. This file holds no process-group code; `pp.py` runs the stages, the plan owns the collectives.
"""

from __future__ import annotations

import importlib

from torch import nn

from mmkit import registry


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


class Stage(nn.Module):
    """Common bookkeeping: position in the pipeline, an unregistered handle on the full model, and the
    optional parallel plan (`parallel/plans/`) whose tensor/context-parallel pieces the stage runs.

    A family's subclass implements `__init__` (register the submodules it holds), `forward`, and the
    class-level questions `num_layers(model)`, `prepare(model, mbs, device, seq_len)` and, when the
    first and last stages share a weight, `tied_weight(model)`.
    """

    def __init__(
        self, model: nn.Module, stage_index: int, num_stages: int, layer_ids: list[int], plan=None, loss=None
    ):
        super().__init__()
        self.stage_index, self.num_stages, self.layer_ids = stage_index, num_stages, list(layer_ids)
        # Kept outside the module tree (no state_dict keys, no parameters()): used only for the
        # model's parameter-free helpers and its embedding methods, which read the very submodules
        # this stage registers below; the plan, when given, supplies the sequence split/head/loss.
        object.__setattr__(self, "full_model", model)
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "_loss_ref", loss)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def loss_fn(self, *args, **kwargs):
        """The family's training loss for a stage without a plan (a plan brings the task's own): the
        function the registry names (`"module:attribute"`), imported on first use."""
        ref = self._loss_ref
        if not isinstance(ref, str) or ":" not in ref:
            raise ValueError(f"{type(self).__name__}: no loss given; build the stages with a plan or a loss")
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    @staticmethod
    def num_layers(model: nn.Module) -> int:
        """How many layers the pipeline splits (the model's `pp_rule` tower)."""
        raise NotImplementedError

    @staticmethod
    def tied_weight(model: nn.Module) -> nn.Parameter | None:
        """The parameter the first and the last stage both hold (tied embeddings), or None."""
        return None

    @staticmethod
    def prepare(model: nn.Module, mbs: list[dict], device, seq_len: int | None):
        """A step's micro-batches -> (args, kwargs, targets, count, shape signature) for the schedule."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"stage {self.stage_index}/{self.num_stages}, layers {self.layer_ids}"


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

    `family`: a registered model family ("wan", "qwen2_5_vl"); its stage class comes from the registry.
    `pp_layers` as in `plan_layers`; `virtual` (stages per rank) is used only when pp_layers is None.
    The model is not modified; layers of other ranks' stages stay in it but this rank's stages never
    touch them. Example:
        stages = split_stages(dit, "wan", pp_size=2, pp_rank=dist.get_rank(), pp_layers=[12, 18])
        stages[0].state_dict().keys()  # "patch_embed.weight", ..., "blocks.11.mlp.fc2.bias"
    """
    spec = registry.get(family)
    cls = spec.resolve("stages")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} must be in [0, parallel.pp={pp_size})")
    layers = plan_layers(cls.num_layers(model), pp_size, pp_layers, virtual)
    n = len(layers)
    loss = spec.loss or None  # a plan-less stage's loss; with a plan the task's is used
    return [cls(model, s, n, layers[s], plan, loss) for s in range(pp_rank, n, pp_size)]
