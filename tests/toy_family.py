"""A toy model family declared entirely outside mmkit, to show that adding a family edits no shared file.

The model is a stack of linear blocks; its HF folder is `config.json` (model_type "toy_mlp") plus
`model.safetensors` with HF-style names ("layers.N.dense.weight"), renamed to mmkit's ("blocks.N.fc.weight").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mmkit.models.common.hf_io import HFModel, load_state_dict, read_json, save_state_dict
from mmkit.parallel.plans import ParallelPlan
from mmkit.registry import FamilySpec, ModelShape, PPRule, TPRule


@dataclass
class ToyConfig:
    width: int = 8
    layers: int = 2
    heads: int = 2

    def to_hf_dict(self) -> dict:
        return {
            "model_type": "toy_mlp",
            "hidden_size": self.width,
            "num_layers": self.layers,
            "heads": self.heads,
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> ToyConfig:
        return cls(width=d["hidden_size"], layers=d["num_layers"], heads=d["heads"])


class ToyBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class ToyModel(nn.Module):
    _repeated_blocks = ("blocks",)

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(ToyBlock(cfg.width) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.width, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


# ---- HF adapter: HF names <-> mmkit names -----------------------------------------------------------
def from_hf(sd: dict) -> dict:
    return {k.replace("layers.", "blocks.").replace(".dense.", ".fc."): v for k, v in sd.items()}


def to_hf(sd: dict) -> dict:
    return {k.replace("blocks.", "layers.").replace(".fc.", ".dense."): v for k, v in sd.items()}


class _Writer:
    def __init__(self, src: Path | None):
        self.hf_config = read_json(src / "config.json")
        self.cfg = ToyConfig.from_hf_dict(self.hf_config)
        self.checked_against = f"toy checkpoint vs {src / 'config.json'}"

    def write(self, sd, out: Path, dtype, max_shard_bytes: int, progress: bool) -> None:
        save_state_dict(to_hf(sd), out, "model", max_shard_bytes, dtype, progress)
        (out / "config.json").write_text(json.dumps(self.hf_config))


class ToyHF:
    tied = None
    side_files = True

    def task(self, cfg) -> str:
        return "regress"

    def read_config(self, folder: Path):
        d = read_json(folder / "config.json")
        return ToyConfig.from_hf_dict(d), d

    def read(self, folder: Path, progress: bool = False, config=None) -> HFModel:
        cfg, d = config if config is not None else self.read_config(folder)
        src = folder.resolve()
        return HFModel(cfg, d, from_hf(load_state_dict(folder)), f"{folder} (toy)", source=src, hf_files=src)

    def run_config(self, src, flavor, config_file):
        return self.read_config(src)

    def writer(self, src, *, layout, task, flavor, tokenizer_from, config_file):
        return _Writer(src)


ADAPTER = ToyHF()


def write_folder(folder: Path, seed: int = 0) -> Path:
    """A toy HF folder with random weights."""
    torch.manual_seed(seed)
    cfg = ToyConfig()
    folder.mkdir(parents=True)
    save_state_dict(to_hf(ToyModel(cfg).state_dict()), folder, "model")
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return folder


# ---- the plan, the task, the pipeline ---------------------------------------------------------------
class ToyPlan(ParallelPlan):
    """Single-process plan: only what the base class applies (AC, compile)."""

    def forward(self, prep: dict):
        return self.task.loss_fn(self.inner(prep["x"]), prep["y"])


class ToyPipeline:
    def __init__(self, model: ToyModel):
        self.model = model

    def __call__(self, x):
        with torch.no_grad():
            return self.model(x)


def load_pipeline(path, task: str = "regress", device="cpu", dtype="fp32") -> ToyPipeline:
    m = ADAPTER.read(Path(path))
    model = ToyModel(m.cfg)
    model.load_state_dict(m.state)
    return ToyPipeline(model.eval())


# ---- the spec ---------------------------------------------------------------------------------------
def _detect(folder: Path) -> bool:
    f = folder / "config.json"
    return f.is_file() and read_json(f).get("model_type") == "toy_mlp"


def _validate(cfg, world: int) -> list[str]:
    if cfg.data.num_workers > 0:
        return [f"data.num_workers={cfg.data.num_workers}: the toy family loads no data; set 0"]
    return []


SPEC = FamilySpec(
    name="toy",
    title="Toy MLP",
    tasks=("regress",),
    flavors=lambda: {"small": ToyConfig},
    detect=_detect,
    config_from_hf=ToyConfig.from_hf_dict,
    build_model=ToyModel,
    model_shape=lambda cfg: ModelShape("toy", cfg.heads, cfg.heads, cfg.layers),
    tp_rules=(TPRule(r"blocks\.\d+\.fc", "colwise"),),
    pp_rule=PPRule(r"blocks\.(\d+)\.", first=(), last=("head.",)),
    hf_layouts=("toyhf",),
    converter="ToyConverter",
    validate=_validate,
    hf="toy_family:ADAPTER",
    plan="toy_family:ToyPlan",
    pipeline="toy_family:load_pipeline",
)
