"""mmkit checkpoints as one full model state: read any of them, write a converted one in any tp/pp layout.

Formats (every tensor file is safetensors; nothing is unpickled):
- **training** (what `mmkit train` writes, `dcp.py`): `DIR/latest`, `DIR/step_N/{dcp/, train_state.json,
  config.toml}`; read with the model config of the run's `model.init_from` (or flavor).
- **unsplit** (tp = pp = 1), format `mmkit-dcp`: a training checkpoint at step 0 exactly as the trainer
  writes it (`OUT/config.toml` with `model.family` and `model.init_from` = the HF folder it came from), so
  `mmkit convert mm-to-hf OUT ...` and `export_model_state(OUT)` read it; plus `OUT/layout.json`.
- **pre-split** (tp > 1 or pp > 1), format `mmkit-mp-rank`, MindSpeed style:
  `OUT/mp_rank_{tp:02d}_{pp:03d}/model.safetensors` (+ `model.safetensors.index.json` when sharded), one
  folder per (tensor-parallel rank, pipeline rank) holding that rank's pieces under GLOBAL parameter
  names (virtual chunks of one rank share its folder), and `OUT/layout.json`.

`layout.json`: {format, version, family, tp, pp, vpp, stage_layers, pp_layers, vit_pp_layers,
tie_word_embeddings, names: "global", model_config (the HF config.json dict), source (the HF folder it
came from), hf_files, tensors: {name: {shape, dtype, tp_dim, stage}}}. A family whose adapter carries side
files (Qwen2.5-VL: config.json, tokenizer, chat template, processor and generation configs) keeps them in
`OUT/hf_files/`, so it goes back to an HF folder without the source; Wan's frozen parts (VAE, umT5,
scheduler) are referenced by `source`.

Example:
    >>> write_mm(read_hf("Qwen2.5-VL-7B-Instruct"), "ckpt/q", plan_layout("qwen2_5_vl", cfg, tp=2))
    >>> family, cfg, state = load_mm_state("ckpt/q")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmkit import registry
from mmkit.checkpoint.common import MMCheckpoint, adapter, check_family, check_state, new_dir
from mmkit.checkpoint.layouts import (
    RANK_DIRS,
    Layout,
    LayoutError,
    merge_states,
    rank_dir,
    split_state,
    stage_of,
    tp_dim,
)
from mmkit.models.common.hf_io import (
    DEFAULT_SHARD_BYTES,
    copy_side_files,
    load_state_dict,
    read_json,
    save_state_dict,
)

FORMAT_DCP, FORMAT_SPLIT = "mmkit-dcp", "mmkit-mp-rank"
LAYOUT_VERSION = 1  # layout.json "version"
LAYOUT_FILE = "layout.json"
HF_FILES = "hf_files"


def layout_file(path: Path) -> Path | None:
    """layout.json of an mmkit checkpoint folder (also when `path` is its step_N folder), else None."""
    for d in (path, path.parent):
        if (d / LAYOUT_FILE).is_file():
            return d / LAYOUT_FILE
    return None


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def read_mm(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    init_from: str | os.PathLike | None = None,
    progress: bool = False,
) -> MMCheckpoint:
    """Any mmkit checkpoint as one full state: pre-split (merged), converted DCP, or a training checkpoint.

    A training checkpoint (no layout.json) takes its model config from the run's `model.init_from` (or
    flavor); `init_from` replaces that folder (e.g. when it moved). Tensors are checked against the config.
    `family` refuses a checkpoint of another family.
    Example: `ck = read_mm("ckpt/qwen_tp2pp2")`; `ck.state`, `ck.model_cfg`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"mmkit checkpoint not found: {p}")
    lf = layout_file(p)
    if lf is None:
        return _read_training(p, family, init_from)
    meta = read_json(lf, "mmkit layout file")
    fmt = meta.get("format")
    if fmt not in (FORMAT_DCP, FORMAT_SPLIT):
        raise ValueError(f"{lf}: format={fmt!r} is not an mmkit layout ({FORMAT_DCP} or {FORMAT_SPLIT})")
    root = lf.parent
    ck_family = meta["family"]
    check_family(ck_family, family, root)
    cfg = registry.get(ck_family, f"{lf}: family").config_from_hf(meta["model_config"])
    expected = {k: tuple(v["shape"]) for k, v in meta.get("tensors", {}).items()}
    if fmt == FORMAT_SPLIT:
        layout = Layout.from_dict(meta)
        on_disk = sorted(d.name for d in root.glob("mp_rank_*") if d.is_dir())
        stray = sorted(set(on_disk) - {rank_dir(*r) for r in layout.ranks})
        if stray:
            raise LayoutError(
                f"{root}: folders {', '.join(stray)} are not part of the layout in {lf} "
                f"(tp={layout.tp}, pp={layout.pp}); the layout file belongs to another checkpoint"
            )
        shards = {
            r: load_state_dict(root / rank_dir(*r))
            for r in tqdm(layout.ranks, desc="read shards", unit="rank", disable=not progress)
            if (root / rank_dir(*r)).is_dir()
        }
        state = merge_states(shards, layout, expected or None)
    else:
        state = _dcp_state(root)
    check_state(ck_family, cfg, state, str(root))
    source = Path(init_from) if init_from else (Path(meta["source"]) if meta.get("source") else None)
    hf_files = root / HF_FILES if (root / HF_FILES).is_dir() else None
    if init_from and adapter(ck_family).side_files:  # the given folder's side files replace the recorded
        hf_files = Path(init_from)
    return MMCheckpoint(ck_family, cfg, meta["model_config"], state, source=source, hf_files=hf_files)


def _dcp_state(path: Path) -> dict[str, torch.Tensor]:
    # names need no cleaning: get_model_state_dict already saved them without wrapper prefixes
    from mmkit.checkpoint.dcp import export_model_state

    return export_model_state(path, "model")


def _read_training(p: Path, family: str | None, init_from) -> MMCheckpoint:
    """A checkpoint `mmkit train` wrote: config from the run's model.init_from / flavor, weights from DCP."""
    from mmkit.checkpoint.dcp import read_checkpoint_info

    info = read_checkpoint_info(p)
    check_family(info.family, family, p)
    src = Path(init_from) if init_from else info.init_from
    if src is not None and not src.is_dir():
        raise FileNotFoundError(
            f"model.init_from of {info.config_file} ({src}) is not a folder; pass --init-from DIR: the HF "
            "folder the run started from (it holds the model config)"
        )
    ad = adapter(info.family)
    cfg, d = ad.run_config(src, info.flavor, info.config_file)
    state = _dcp_state(info.step_dir)
    check_state(info.family, cfg, state, str(info.step_dir))
    hf_files = src if ad.side_files else None
    return MMCheckpoint(info.family, cfg, d, state, source=src, hf_files=hf_files)


def load_mm_state(path: str | os.PathLike):
    """(family, model config, full mmkit state dict) of any mmkit checkpoint: pre-split, converted, or trained.

    For `model.init_from` of mm checkpoints: the state loads with `model.load_state_dict(state)`.
    Example: `family, cfg, state = load_mm_state("ckpt/wan_tp2pp2")`.
    """
    ck = read_mm(path)
    return ck.family, ck.model_cfg, ck.state


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
def _tensor_index(state: dict[str, torch.Tensor], layout: Layout) -> dict:
    index = {}
    for k, v in sorted(state.items()):
        index[k] = {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        index[k]["tp_dim"] = tp_dim(layout.family, k)
        index[k]["stage"] = stage_of(k, layout)
    return index


def _write_dcp(ck: MMCheckpoint, out: Path) -> None:
    """The state as step 0 of a training checkpoint, through the trainer's own `save_checkpoint`."""
    from mmkit.checkpoint.dcp import save_checkpoint
    from mmkit.config import Config, save_resolved

    ad = adapter(ck.family)
    state = dict(ck.state)
    if ad.tied and getattr(ck.model_cfg, "tie_word_embeddings", False):
        # DCP's safetensors writer refuses two names sharing memory: store the tied head as its own copy
        head, embed = ad.tied
        state[head] = state[embed].clone()
    with torch.device("meta"):
        model = registry.get(ck.family).build_model(ck.model_cfg)
    model.load_state_dict(state, strict=True, assign=True)  # the tensors themselves, no copy
    cfg = Config()
    cfg.model.family, cfg.model.task = ck.family, ad.task(ck.model_cfg)
    # the run this checkpoint continues: its HF folder (Wan: the pipeline with the frozen VAE / umT5)
    cfg.model.init_from = str(ck.source) if ck.source is not None else None
    save_checkpoint(out, 0, model, config=cfg, save_rng=False)
    save_resolved(cfg, out)


def write_mm(
    ck: MMCheckpoint,
    out: str | os.PathLike,
    layout: Layout,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    command: str = "convert",
    overwrite: bool = False,
) -> Path:
    """Write `ck` as an mmkit checkpoint in `layout`: DCP when tp = pp = 1, else per-rank pre-split folders.

    `out` must be new or empty, or with `overwrite` an earlier mmkit output; it appears only when complete,
    marked as `command`'s output (`new_dir`). Returns `out`.
    Example: `write_mm(read_hf("Qwen2.5-VL-3B"), "ckpt/q", plan_layout("qwen2_5_vl", cfg, tp=2))`.
    """
    out = Path(out)
    split = layout.tp > 1 or layout.pp > 1
    meta = {"format": FORMAT_SPLIT if split else FORMAT_DCP, "version": LAYOUT_VERSION, **layout.to_dict()}
    meta.update(names="global", model_config=ck.hf_config, source=str(ck.source) if ck.source else None)
    with new_dir(out, command, overwrite) as tmp:
        if ck.hf_files is not None:
            copy_side_files(ck.hf_files, tmp / HF_FILES)
            meta["hf_files"] = HF_FILES
        if split:
            shards = split_state(ck.state, layout, progress=progress)
            meta["rank_dirs"] = RANK_DIRS
            for r in tqdm(layout.ranks, desc="write shards", unit="rank", disable=not progress):
                save_state_dict(shards[r], tmp / rank_dir(*r), "model", max_shard_bytes)
        else:
            _write_dcp(ck, tmp)
        meta["tensors"] = _tensor_index(ck.state, layout)
        (tmp / LAYOUT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
