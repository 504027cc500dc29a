"""Model families: one `FamilySpec` each, declared beside the model in `models/<family>/spec.py`.

Shared code (config validation, the trainer, parallel plans, pipelines, converters, the memory
estimator) asks the registry for what a family does differently; it never branches on a family name.
A spec holds plain data and callables that live in the model folder (configs, HF detection, the
model builder, the tensor- and pipeline-parallel split declaration). What lives above `models/` (the
parallel plan, the pipeline stages, the training task, the inference pipeline) is named by an import
reference `"package.module:attribute"`, resolved on first use, so that `models/` never imports
`mmkit.parallel`, `mmkit.train` or `mmkit.infer`.

Built-in families are discovered from `BUILTIN`; others (a plug-in, a test's toy family) call
`register(spec)`. Example:

    >>> from mmkit import registry
    >>> spec = registry.get("wan")
    >>> spec.tasks
    ('t2v', 'i2v')
    >>> registry.detect("Wan2.1-T2V-1.3B-Diffusers").name
    'wan'
    >>> plan_cls = spec.resolve("plan")
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the families shipped with mmkit: module that defines `SPEC`
BUILTIN = ("mmkit.models.wan.spec", "mmkit.models.qwen2_5_vl.spec", "mmkit.models.opensoraplan.spec")


# ---------------------------------------------------------------------------------------------------
# Declarations a spec is made of
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the layout rules need to know about a model: attention heads, KV heads, layers per tower."""

    family: str
    heads: int
    kv_heads: int
    layers: int  # the tower that pipeline stages split (DiT blocks, LLM decoder layers)
    vision_layers: int = 0  # a VLM's vision-tower blocks (all on pipeline stage 0)


# Tensor-parallel styles: which dim of each parameter of a module a tp rank holds (None = replicated).
#   colwise   Linear split by output features (whole heads / MLP columns): weight and bias on dim 0
#   rowwise   Linear split by input features, partial outputs summed: weight on dim 1, bias replicated
#   head_norm RMSNorm over all heads whose weight follows the heads of q/k: weight on dim 0
#   vocab     embedding table / LM head split by vocabulary rows: weight on dim 0
TP_STYLES: dict[str, dict[str, int]] = {
    "colwise": {"weight": 0, "bias": 0},
    "rowwise": {"weight": 1},
    "head_norm": {"weight": 0},
    "vocab": {"weight": 0},
}


@dataclass(frozen=True)
class TPRule:
    """One line of a family's tensor-parallel plan: modules whose path fully matches `pattern` get `style`.

    The live plan (`parallel/plans/<family>.py`) applies these styles to the modules and the converter
    (`checkpoint/layouts.py`) derives its per-tensor split from the same lines, so a converted shard is
    exactly what a tp rank's DTensor holds. Example: `TPRule(r"blocks\\.\\d+\\.attn\\.(q|k|v)", "colwise")`.
    """

    pattern: str
    style: str

    def __post_init__(self):
        if self.style not in TP_STYLES:
            raise ValueError(f"TPRule style={self.style!r}: choose one of {', '.join(TP_STYLES)}")

    def matches(self, module_path: str) -> bool:
        return re.fullmatch(self.pattern, module_path) is not None


@dataclass(frozen=True)
class PPRule:
    """Where a family's tensors sit in a pipeline: numbered layers, first-stage and last-stage prefixes."""

    layer: str  # regex on parameter names; group 1 = the global layer index, e.g. r"blocks\.(\d+)\."
    first: tuple[str, ...]  # name prefixes held by the first stage (embeddings, a vision tower)
    last: tuple[str, ...]  # name prefixes held by the last stage (final norm, head)


def tp_dim(rules: tuple[TPRule, ...], name: str) -> int | None:
    """The dim a tp rank shards of parameter `name` under `rules`, None if replicated.

    Example: `tp_dim(registry.get("wan").tp_rules, "blocks.0.attn.out.weight")` -> `1`.
    """
    module, _, leaf = name.rpartition(".")
    for rule in rules:
        if rule.matches(module):
            return TP_STYLES[rule.style].get(leaf)
    return None


@dataclass(frozen=True)
class EstimatorInfo:
    """What the memory estimator (`mmkit/tools/memory.py`) needs of a family.

    `kind` picks the activation formulas: "dit" (a Wan-style DiT block with cross-attention to text
    tokens) or "vlm" (a decoder LLM with a vision tower); `names` are the public model names the tool
    accepts (lower case) -> flavor; `stats(cfg, meta_model)` -> the sizes `ModelStats` holds;
    `block` / `last` match the parameters of the repeated blocks / of the last pipeline stage.
    """

    kind: str
    names: Mapping[str, str]
    stats: Callable[[Any, Any], dict]
    block: str
    last: str


def _no_rules(cfg, world: int) -> list[str]:
    return []


@dataclass(frozen=True)
class FamilySpec:
    """Everything mmkit needs to know about one model family.

    Plain fields and callables live in `models/<family>/`; string fields are import references
    (`"module:attribute"`) to code above `models/`, resolved lazily by `resolve(field)`.
    """

    name: str  # "wan": the value of model.family in configs and checkpoints
    title: str  # human name for messages, "Wan2.1"
    tasks: tuple[str, ...]  # training/inference tasks, the first is the default
    flavors: Callable[[], Mapping[str, Callable[[], Any]]]  # named sizes -> factory of a fresh model config
    detect: Callable[[Path], bool]  # does this HF folder hold this family? (reads its own files only)
    config_from_hf: Callable[[dict], Any]  # HF config.json dict -> mmkit model config
    build_model: Callable[[Any], Any]  # model config -> nn.Module (works under torch.device("meta"))
    model_shape: Callable[[Any], ModelShape]  # model config -> layout-relevant numbers
    tp_rules: tuple[TPRule, ...]  # the tensor-parallel plan, declared once
    pp_rule: PPRule  # the pipeline split, declared once
    hf_layouts: tuple[str, ...]  # HF layouts it exports to, the first is the default
    converter: str  # the class name `mm-convert` accepts, "WanConverter"
    packed: bool = False  # trains on token rows packed to data.cutoff_len (fixed pipeline shapes)
    validate: Callable[[Any, int], list[str]] = _no_rules  # (Config, world size) -> error lines
    # import references to code above models/ ("module:attribute")
    hf: str = ""  # the HF adapter (read/write a Hugging Face folder)
    plan: str = ""  # ParallelPlan subclass
    stages: str = ""  # the pipeline Stage subclass (parallel/pp_stages.py: prepare, tied_weight, forward)
    task: str = ""  # fn(cfg, device) -> training task
    loss: str = ""  # the training loss of pipeline stages built without a plan (a plan uses its task's)
    data: str = ""  # fn(cfg, task, rank, world_size) -> (dataset, sampler, loader)
    pipeline: str = ""  # fn(path, task, device, dtype) -> inference pipeline
    vae_convert: str = (
        ""  # fn(src, out, to, progress) -> Path: the VAE between its release and diffusers layouts
    )
    # `mmkit create-tiny KIND DIR`: kind -> fn(outdir, seed=0, **options) writing a tiny random model in the
    # real HF layout (options the CLI offers: original_layout)
    tiny: Mapping[str, Callable[..., Path]] = field(default_factory=dict)
    estimator: EstimatorInfo | None = None  # for the memory estimator tool

    def resolve(self, what: str) -> Any:
        """The object a reference field names. Example: `registry.get("wan").resolve("plan")`."""
        ref = getattr(self, what)
        if not isinstance(ref, str) or ":" not in ref:
            raise LookupError(f"model family {self.name!r} declares no {what} (its spec has {what}={ref!r})")
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)

    def flavor_names(self) -> list[str]:
        return list(self.flavors())

    def flavor(self, name: str, field_name: str = "model.flavor"):
        """A fresh model config of a named size. Example: `registry.get("qwen2_5_vl").flavor("7B")`."""
        table = self.flavors()
        if name not in table:
            raise ValueError(
                f"{field_name}={name!r}: unknown {self.title} flavor; choose one of {', '.join(table)}"
            )
        return table[name]()

    def tp_dim(self, name: str) -> int | None:
        """The dim a tp rank shards of parameter `name`, None if replicated."""
        return tp_dim(self.tp_rules, name)


# ---------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------
_SPECS: dict[str, FamilySpec] = {}
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        spec = importlib.import_module(module).SPEC
        _SPECS.setdefault(spec.name, spec)


def register(spec: FamilySpec, replace: bool = False) -> FamilySpec:
    """Add a family. Example: `registry.register(FamilySpec(name="toy", ...))`."""
    _load_builtins()
    if spec.name in _SPECS and not replace and _SPECS[spec.name] is not spec:
        raise ValueError(f"model family {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a family (tests that register a toy family clean up with this)."""
    _SPECS.pop(name, None)


def names() -> list[str]:
    """Every registered family name, built-ins first. Example: `registry.names()` -> `['wan', 'qwen2_5_vl']`."""
    _load_builtins()
    return list(_SPECS)


def get(name: str, field_name: str = "model.family") -> FamilySpec:
    """The spec of family `name`; an unknown name is a clear error naming the field and the choices."""
    _load_builtins()
    if name not in _SPECS:
        raise ValueError(f"{field_name}={name!r}: unknown model family; choose one of {', '.join(_SPECS)}")
    return _SPECS[name]


def specs() -> list[FamilySpec]:
    _load_builtins()
    return list(_SPECS.values())


def tiny_kinds() -> dict[str, Callable[..., Path]]:
    """Every `mmkit create-tiny` kind of every family -> its writer."""
    return {kind: fn for spec in specs() for kind, fn in spec.tiny.items()}


def by_converter(converter: str) -> FamilySpec | None:
    """The family whose `mm-convert` class name is `converter` (e.g. "WanConverter"), else None."""
    return next((s for s in specs() if s.converter == converter), None)


def detect(folder: str | os.PathLike) -> FamilySpec:
    """The family of a Hugging Face folder, asked of every spec's own `detect`.

    Raises FileNotFoundError for a missing folder or one without model_index.json / config.json, and
    ValueError when no family (or more than one) recognises it. Example: `registry.detect(path).name`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face folder not found: {folder}")
    if not (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder: it has neither model_index.json (a diffusers "
            "pipeline) nor config.json (a transformers model or a diffusers transformer folder)"
        )
    found = [s for s in specs() if s.detect(folder)]
    if len(found) == 1:
        return found[0]
    if not found:
        described = describe_folder(folder)
        raise ValueError(
            f"{folder}: {described} is not a model family mmkit knows; known: "
            + ", ".join(f"{s.name} ({s.title})" for s in specs())
        )
    raise ValueError(f"{folder}: recognised by several families ({', '.join(s.name for s in found)})")


def describe_folder(folder: Path) -> str:
    """What an HF folder says it is (pipeline class or model_type / architectures), for messages."""
    from mmkit.models.common.hf_io import read_json

    if (folder / "model_index.json").is_file():
        return (
            f"a diffusers pipeline _class_name={read_json(folder / 'model_index.json').get('_class_name')!r}"
        )
    d = read_json(folder / "config.json")
    return (
        f"config.json with model_type={d.get('model_type')!r} / _class_name={d.get('_class_name')!r} "
        f"/ architectures={d.get('architectures')!r}"
    )
