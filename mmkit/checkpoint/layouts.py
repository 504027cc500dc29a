"""Tensor- and pipeline-parallel layouts of mmkit state dicts: split one state into per-rank shards and merge back.

Pure functions over mmkit state dicts (mmkit parameter names, i.e. after the family's HF adapter);
nothing here reads or writes files (that is `mm.py`).

- **TP split**: the dim a tensor-parallel rank shards of each parameter, `None` for replicated, is the
  family's own tensor-parallel plan (`FamilySpec.tp_rules`, the same lines the live DTensor plan in
  `mmkit/parallel/plans/` applies): colwise Linear = weight and bias on dim 0, rowwise = weight on dim 1
  (bias replicated). Pieces follow DTensor's `Shard(dim)` rule (torch.chunk sizes: ceil(n / tp), the last
  pieces may be shorter), so a shard is exactly what that rank's DTensor holds.
- **PP split** (`FamilySpec.pp_rule`): which pipeline stage holds a tensor: the numbered layers by
  `stage_layers`, the input-side modules on the first stage, the output-side modules on the last. With
  virtual stages, stage s sits on pipeline rank s % pp (stage order is chunk-major, as
  `mmkit.parallel.dims.stage_layers`).
- Names stay GLOBAL in every shard (`blocks.17.attn.q.weight` keeps 17 on any stage): no renumbering, so a
  shard loads into a model built with the full layer list by name.

Every layout is checked against the model first with `mmkit.parallel.dims.check_model_layout`, the same
rules training applies (tp vs heads / KV heads, pipeline counts summing to the layers, no empty stage).

Example:
    >>> layout = plan_layout("qwen2_5_vl", cfg, tp=2, pp_layers=[[1, 1]])
    >>> shards = split_state(state, layout)          # {(tp_rank, pp_rank): {name: tensor}}
    >>> again = merge_states(shards, layout)          # bit-exact: torch.equal for every tensor
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mmkit import registry
from mmkit.parallel.dims import LayoutError, check_model_layout, stage_layers

RANK_DIRS = "mp_rank_{tp:02d}_{pp:03d}"  # one folder per (tp rank, pipeline rank), MindSpeed/Megatron style


@dataclass
class Layout:
    """A tp x pp layout of one model: which rank holds which piece of which tensor.

    `stages` = layer counts per pipeline stage in stage order (len = pp x virtual chunks); `pp_layers` and
    `vit_pp_layers` are kept as the user wrote them (for the layout file); `tied` = the model's
    tie_word_embeddings (the LM head is the embedding).
    """

    family: str
    tp: int = 1
    pp: int = 1
    stages: list[int] = field(default_factory=list)
    pp_layers: list | None = None
    vit_pp_layers: list | None = None
    tied: bool = False

    @property
    def vpp(self) -> int:
        """Virtual pipeline chunks per rank."""
        return max(len(self.stages) // self.pp, 1)

    @property
    def ranks(self) -> list[tuple[int, int]]:
        """Every (tp_rank, pp_rank), tp fastest."""
        return [(t, p) for p in range(self.pp) for t in range(self.tp)]

    def stage_rank(self, stage: int) -> int:
        """The pipeline rank that runs `stage` (virtual stages go round-robin over the ranks)."""
        return stage % self.pp

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "tp": self.tp,
            "pp": self.pp,
            "vpp": self.vpp,
            "stage_layers": list(self.stages),
            "pp_layers": self.pp_layers,
            "vit_pp_layers": self.vit_pp_layers,
            "tie_word_embeddings": self.tied,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Layout:
        return cls(
            family=d["family"],
            tp=int(d["tp"]),
            pp=int(d["pp"]),
            stages=[int(x) for x in d["stage_layers"]],
            pp_layers=d.get("pp_layers"),
            vit_pp_layers=d.get("vit_pp_layers"),
            tied=bool(d.get("tie_word_embeddings", False)),
        )


def _pp_from_layers(pp_layers) -> int:
    """Pipeline ranks a pp_layers value implies: its length, or the inner length for nested (virtual) lists."""
    if pp_layers and all(isinstance(x, (list, tuple)) for x in pp_layers):
        return len(pp_layers[0])
    return len(pp_layers)


def _rename(msg: str, names: Mapping[str, str] | None) -> str:
    """Replace training-config field names in `msg` by the caller's, in one pass (longest name first)."""
    if not names:
        return msg
    pattern = "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True))
    return re.sub(pattern, lambda m: names[m.group(0)], msg)


def plan_layout(
    family: str,
    model_cfg,
    *,
    tp: int = 1,
    pp: int | None = None,
    pp_layers=None,
    vit_pp_layers=None,
    names: Mapping[str, str] | None = None,
) -> Layout:
    """Check a tp/pp layout against the model config and return it; `LayoutError` naming the field if impossible.

    `pp` defaults to what `pp_layers` implies ([12, 16] and [[12, 16]] -> 2; [[a, b], [c, d]] -> 2 ranks x 2
    virtual chunks), else 1; without `pp_layers` the layers split evenly. `vit_pp_layers` (models with a vision tower)
    must keep the vision tower on stage 0, e.g. [[32, 0]]. `names` renames the training-config fields in
    error messages to the caller's (e.g. {"parallel.tp": "--tp"}).
    Example: `plan_layout("wan", WanConfig(num_layers=30), tp=2, pp_layers=[14, 16]).stages` -> `[14, 16]`.
    """
    if family not in registry.names():
        raise LayoutError(f"family={family!r}: no layout rules; known: {', '.join(registry.names())}")
    spec = registry.get(family)
    vision_layers = spec.model_shape(model_cfg).vision_layers
    for fld, value in (("parallel.tp", tp), ("parallel.pp", pp)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise LayoutError(_rename(f"{fld}={value!r}: must be a positive integer", names))
    if pp is None:
        pp = _pp_from_layers(pp_layers) if pp_layers is not None else 1
    if vit_pp_layers is not None and not vision_layers:
        only = " / ".join(vision_families())
        msg = f"vit_pp_layers applies to {only} only ({spec.title} has no vision tower); drop it"
        raise LayoutError(_rename(msg, names))
    try:
        shape = check_model_layout(
            family, model_cfg, tp=tp, pp=pp, pp_layers=pp_layers, vit_pp_layers=vit_pp_layers
        )
        stages = stage_layers(pp, shape.layers, pp_layers)
    except LayoutError as e:
        raise LayoutError(_rename(str(e), names)) from None
    if vision_layers and vit_pp_layers is None:  # default: the whole vision tower on stage 0
        vit_pp_layers = [vision_layers] + [0] * (len(stages) - 1)
    return Layout(
        family=family,
        tp=tp,
        pp=pp,
        stages=stages,
        pp_layers=pp_layers if pp_layers is not None else list(stages),
        vit_pp_layers=vit_pp_layers,
        tied=bool(getattr(model_cfg, "tie_word_embeddings", False)),
    )


def tp_dim(family: str, name: str) -> int | None:
    """The dim tensor parallelism shards `name` along, or None (replicated).

    Example: `tp_dim("wan", "blocks.3.attn.out.weight")` -> 1; `tp_dim("wan", "head.proj.weight")` -> None.
    """
    return registry.get(family).tp_dim(name)


def has_vision_tower(family: str) -> bool:
    """Whether `family`'s models have a vision tower (their stages take `vit_pp_layers`).

    Example: `has_vision_tower("qwen2_5_vl")` -> True; `has_vision_tower("wan")` -> False.
    """
    spec = registry.get(family)
    return spec.model_shape(next(iter(spec.flavors().values()))()).vision_layers > 0


def vision_families() -> list[str]:
    """The families whose models have a vision tower, e.g. `["qwen2_5_vl"]`."""
    return [s.name for s in registry.specs() if has_vision_tower(s.name)]


def _tied(layout: Layout) -> tuple[str, str] | None:
    """(LM head, embedding) names when the layout's model ties them (tie_word_embeddings), else None."""
    return registry.get(layout.family).resolve("hf").tied if layout.tied else None


def stage_of(name: str, layout: Layout) -> int:
    """The pipeline stage that holds tensor `name` (a global layer index picks its stage).

    Example: with stages [1, 1], `stage_of("language.layers.1.attn.q_proj.weight", layout)` -> 1.
    """
    rule = registry.get(layout.family).pp_rule
    m = re.match(rule.layer, name)
    if m:
        idx, start = int(m.group(1)), 0
        for s, n in enumerate(layout.stages):
            if idx < start + n:
                return s
            start += n
        raise LayoutError(
            f"{name}: layer {idx} is beyond the layout's {sum(layout.stages)} layers "
            f"(stages {layout.stages}); the checkpoint and the model config disagree"
        )
    if name.startswith(rule.first):
        return 0
    if name.startswith(rule.last):
        return len(layout.stages) - 1
    raise LayoutError(
        f"{name}: no pipeline rule places this {layout.family} tensor (known prefixes: "
        f"{', '.join(rule.first + rule.last)} and numbered layers); is it a {layout.family} checkpoint?"
    )


def shard_bounds(size: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, end) of tp rank `rank`'s piece of a dim of `size`, as DTensor's Shard places it.

    Example: `shard_bounds(10, 4, 3)` -> `(9, 10)` (pieces 3, 3, 3, 1).
    """
    step = math.ceil(size / tp)
    start = min(rank * step, size)
    return start, min(start + step, size)


def _piece(t: torch.Tensor, dim: int | None, tp: int, rank: int) -> torch.Tensor:
    if dim is None or tp == 1:
        return t
    start, end = shard_bounds(t.shape[dim], tp, rank)
    return t.narrow(dim, start, end - start)


def placement(name: str, layout: Layout) -> list[int]:
    """The pipeline ranks whose shard holds `name` (one, except none for a tied LM head inside stage 0's rank).

    With tied embeddings the LM head is the embedding: the last stage keeps its own copy under the head's
    name when it runs on another rank than the first stage; on a single rank only the embedding is stored.
    Example: with stages [14, 14], `placement("language.norm.weight", layout)` -> `[1]`.
    """
    tied = _tied(layout)
    if tied and name == tied[0]:
        last = layout.stage_rank(len(layout.stages) - 1)
        return [] if last == layout.stage_rank(0) else [last]
    return [layout.stage_rank(stage_of(name, layout))]


def split_state(
    state: Mapping[str, torch.Tensor], layout: Layout, progress: bool = False
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """One full mmkit state dict -> `{(tp_rank, pp_rank): {global name: that rank's piece}}`.

    Pieces are views of `state`'s tensors (nothing is copied). A tied Qwen state may hold the LM head or not.
    Example: `shards = split_state(model.state_dict(), plan_layout("wan", cfg, tp=2, pp=2))`.
    """
    state = dict(state)
    tied = _tied(layout)
    if tied and tied[1] in state:
        state.setdefault(tied[0], state[tied[1]])
    shards: dict[tuple[int, int], dict[str, torch.Tensor]] = {r: {} for r in layout.ranks}
    for name in tqdm(sorted(state), desc="split", unit="tensor", disable=not progress):
        tensor, dim = state[name], tp_dim(layout.family, name)
        if dim is not None and dim >= tensor.ndim:
            raise LayoutError(f"{name}: shape {tuple(tensor.shape)} has no dim {dim} to shard over tp")
        for p in placement(name, layout):
            for t in range(layout.tp):
                shards[(t, p)][name] = _piece(tensor, dim, layout.tp, t)
    return shards


def rank_dir(tp_rank: int, pp_rank: int) -> str:
    """Folder name of one rank's shard, MindSpeed/Megatron style. Example: `rank_dir(1, 0)` -> `"mp_rank_01_000"`."""
    return RANK_DIRS.format(tp=tp_rank, pp=pp_rank)


def merge_states(
    shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
    layout: Layout,
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """The exact inverse of `split_state`: per-rank shards -> one full state dict.

    Checks, each with an error naming the rank folder and tensor: every rank present; every tp rank of a
    stage holds the same names; each tensor sits on the rank the layout puts it; replicated copies are
    identical; the merged shapes equal `expected` ({name: full shape}) and no name is missing. A tied Qwen
    LM head comes back as the embedding (and must equal the last stage's copy).
    Example: `state = merge_states(shards, layout, {k: v.shape for k, v in model.state_dict().items()})`.
    """
    missing = [rank_dir(*r) for r in layout.ranks if r not in shards]
    if missing:
        raise LayoutError(
            f"layout tp={layout.tp} pp={layout.pp} needs {len(layout.ranks)} rank shards; missing: "
            f"{', '.join(missing)}. Copy the whole checkpoint folder"
        )
    extra = [rank_dir(*r) for r in shards if r not in layout.ranks]
    if extra:
        raise LayoutError(f"shards {', '.join(extra)} are outside the layout tp={layout.tp} pp={layout.pp}")
    out: dict[str, torch.Tensor] = {}
    for p in range(layout.pp):
        names = set(shards[(0, p)])
        for t in range(1, layout.tp):
            if set(shards[(t, p)]) != names:
                diff = sorted(names ^ set(shards[(t, p)]))
                raise LayoutError(
                    f"{rank_dir(t, p)} and {rank_dir(0, p)} hold different tensors (e.g. {diff[:3]}); "
                    "every tp rank of a stage holds a piece of the same tensors"
                )
        for name in sorted(names):
            where = placement(name, layout)
            if p not in where:
                raise LayoutError(
                    f"{rank_dir(0, p)} holds {name}, which the layout (stages {layout.stages}) puts on pipeline "
                    f"rank(s) {where}; the layout file does not describe these shards"
                )
            pieces = [shards[(t, p)][name] for t in range(layout.tp)]
            dim = tp_dim(layout.family, name)
            if dim is None:
                for t in range(1, layout.tp):
                    if not torch.equal(pieces[t], pieces[0]):
                        raise LayoutError(
                            f"{name}: replicated tensor differs between {rank_dir(0, p)} and {rank_dir(t, p)}"
                        )
                full = pieces[0]
            else:
                full = torch.cat(pieces, dim=dim) if layout.tp > 1 else pieces[0]
            if name in out:
                raise LayoutError(f"{name}: held by two pipeline ranks; each tensor belongs to one stage")
            out[name] = full
    tied = _tied(layout)
    if tied and tied[1] in out:
        head_name, embed_name = tied
        head = out.get(head_name)
        if head is not None and not torch.equal(head, out[embed_name]):
            raise LayoutError(
                f"tie_word_embeddings=true but the last stage's {head_name} differs from {embed_name}: the "
                "tied copies drifted apart during training; untie the model (tie_word_embeddings=false) first"
            )
        out[head_name] = out[embed_name]
    if expected is not None:
        lacking = sorted(set(expected) - set(out))
        unknown = sorted(set(out) - set(expected))
        if lacking or unknown:
            raise LayoutError(
                f"merged shards do not match the model: {len(lacking)} missing (e.g. {lacking[:3]}), "
                f"{len(unknown)} unexpected (e.g. {unknown[:3]})"
            )
        wrong = [
            f"{k} {tuple(out[k].shape)} vs {tuple(s)}"
            for k, s in expected.items()
            if tuple(out[k].shape) != tuple(s)
        ]
        if wrong:
            raise LayoutError(f"merged tensor shapes differ from the model: {'; '.join(wrong[:3])}")
    return out


__all__ = [
    "Layout",
    "LayoutError",
    "merge_states",
    "placement",
    "plan_layout",
    "rank_dir",
    "shard_bounds",
    "split_state",
    "stage_of",
    "tp_dim",
]
