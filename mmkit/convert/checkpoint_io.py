"""mmkit checkpoints on disk for `mmkit convert` / `mm-convert`: read any format, write any layout.

Formats (every tensor file is safetensors; nothing is unpickled):
- **HF folder** (input of hf-to-mm, output of mm-to-hf): a diffusers Wan pipeline folder (or its
  `transformer/`, or an original-release Wan DiT folder), or a transformers Qwen2.5-VL folder.
- **unsplit** (tp = pp = 1): an mmkit DCP training checkpoint exactly as the trainer writes it
  (`OUT/latest`, `OUT/step_0/{dcp/, train_state.json, config.toml}`, `OUT/config.toml` with
  `model.family` and `model.init_from` = the HF folder it came from), so `mmkit convert mm-to-hf OUT ...`
  and `export_model_state(OUT)` read it; plus `OUT/layout.json`.
- **pre-split** (tp > 1 or pp > 1), MindSpeed style: `OUT/mp_rank_{tp:02d}_{pp:03d}/model.safetensors`
  (+ `model.safetensors.index.json` when sharded), one folder per (tp rank, pipeline rank) holding that
  rank's pieces under GLOBAL parameter names (virtual chunks of one rank share its folder), and
  `OUT/layout.json`.

`layout.json`: {format, version, family, tp, pp, vpp, stage_layers, pp_layers, vit_pp_layers,
tie_word_embeddings, names: "global", model_config (the HF config.json dict), source (the HF folder it
came from), hf_files, tensors: {name: {shape, dtype, tp_dim, stage}}}. Qwen checkpoints carry
`OUT/hf_files/` (config.json, tokenizer, chat template, processor and generation configs) so they go back
to a transformers folder without the source; Wan's frozen parts (VAE, umT5, scheduler) are referenced
by `source`.

Example:
    >>> hf_to_mm("Qwen2.5-VL-7B-Instruct", "ckpt/qwen_tp2pp2", tp=2, pp_layers=[14, 14])
    >>> resplit("ckpt/qwen_tp2pp2", "ckpt/qwen_unsplit")                      # tp1 pp1 -> DCP
    >>> mm_to_hf("ckpt/qwen_unsplit", "Qwen2.5-VL-7B-again")
    >>> family, cfg, state = load_mm_state("ckpt/qwen_tp2pp2")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmkit.convert.layouts import (
    Layout,
    LayoutError,
    merge_states,
    plan_layout,
    rank_dir,
    split_state,
    stage_of,
)
from mmkit.convert.layouts import tp_dim as layout_tp_dim
from mmkit.models.common.hf_io import check_keys, find_weight_files, read_json, save_state_dict

FORMAT_DCP, FORMAT_SPLIT = "mmkit-dcp", "mmkit-mp-rank"
FORMAT_VERSION = 1
LAYOUT_FILE = "layout.json"
HF_FILES = "hf_files"
DEFAULT_SHARD_BYTES = 5 * 1024**3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Files that hold weights: never copied as side files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".index.json")


@dataclass
class MMCheckpoint:
    """One model's full mmkit state plus what is needed to write it back out as a Hugging Face folder."""

    family: str  # "wan" | "qwen2_5_vl"
    model_cfg: Any  # WanConfig | Qwen2_5_VLConfig
    hf_config: dict  # the HF config.json dict (diffusers transformer config / transformers config)
    state: dict[str, torch.Tensor]  # mmkit names, full (unsplit) tensors
    source: Path | None = None  # the HF folder it came from (Wan: the pipeline with the frozen parts)
    hf_files: Path | None = None  # Qwen: folder with config.json + tokenizer/processor files


# ---------------------------------------------------------------------------------------------------
# Model configs and checks
# ---------------------------------------------------------------------------------------------------
def config_from_dict(family: str, d: dict):
    """The mmkit model config of an HF config.json dict. Example: `config_from_dict("wan", json.load(f))`."""
    if family == "wan":
        from mmkit.models.wan.config import WanConfig

        return WanConfig.from_dict(d).validate()
    from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_hf_dict(d)


def _meta_model(family: str, cfg) -> torch.nn.Module:
    with torch.device("meta"):
        if family == "wan":
            from mmkit.models.wan.model import WanTransformer

            return WanTransformer(cfg)
        from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel

        return Qwen2_5_VLModel(cfg)


def model_shapes(family: str, cfg) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the mmkit model a config describes (built on the meta device, no memory).

    Example: `model_shapes("wan", WanConfig(num_layers=2))["blocks.1.attn.q.weight"]` -> `(1536, 1536)`.
    """
    return {k: tuple(v.shape) for k, v in _meta_model(family, cfg).state_dict().items()}


def check_state(family: str, cfg, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise one clear error unless `state` has exactly the model's names and shapes.

    Example: `check_state("qwen2_5_vl", cfg, state, "ckpt/q")`.
    """
    want = model_shapes(family, cfg)
    check_keys(want, state, where)
    wrong = [f"{k}: {tuple(state[k].shape)} vs {s}" for k, s in want.items() if tuple(state[k].shape) != s]
    if wrong:
        raise ValueError(
            f"{where}: {len(wrong)} tensor shape(s) differ from the model config, e.g. {'; '.join(wrong[:3])}"
        )


def _cast(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)} (or leave unset)")
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def detect_family(folder: str | os.PathLike) -> str:
    """'wan' or 'qwen2_5_vl' for a Hugging Face folder, from its model_index.json / config.json.

    Example: `detect_family("Wan2.1-T2V-1.3B-Diffusers")` -> `"wan"`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face folder not found: {folder}")
    if (folder / "model_index.json").is_file():
        return "wan"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder: it has neither model_index.json (a diffusers Wan "
            "pipeline) nor config.json (a transformers model or a Wan transformer folder)"
        )
    d = read_json(folder / "config.json")
    if d.get("model_type") == "qwen2_5_vl":
        return "qwen2_5_vl"
    if d.get("_class_name") in ("WanTransformer3DModel", "WanModel"):
        return "wan"
    raise ValueError(
        f"{folder / 'config.json'}: model_type={d.get('model_type')!r} / _class_name={d.get('_class_name')!r} "
        "is neither Qwen2.5-VL (model_type 'qwen2_5_vl') nor a Wan2.1 DiT (WanTransformer3DModel / WanModel)"
    )


def _check_family(family: str, want: str | None, where: Path) -> None:
    if want is not None and want != family:
        raise ValueError(f"{where} holds a {family} model, not {want}; use the {family} converter")


def _load_files(folder: Path, progress: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in tqdm(find_weight_files(folder), desc=f"read {folder.name}", unit="file", disable=not progress):
        sd.update(load_file(str(f)))
    return sd


def read_hf(folder: str | os.PathLike, family: str | None = None, progress: bool = False) -> MMCheckpoint:
    """A Hugging Face folder as a full mmkit state (names mapped by `models/<family>/hf.py`), checked.

    Wan: a diffusers pipeline folder, its `transformer/` folder, or an original-release DiT folder.
    Qwen2.5-VL: a transformers folder (either key layout). `family` refuses another family.
    Example: `ck = read_hf("Qwen2.5-VL-3B-Instruct")`; `ck.state["language.norm.weight"]`.
    """
    folder = Path(folder)
    found = detect_family(folder)
    _check_family(found, family, folder)
    if found == "qwen2_5_vl":
        from mmkit.models.qwen2_5_vl import hf as qwen_hf

        d = read_json(folder / "config.json")
        cfg = config_from_dict(found, d)
        state = qwen_hf.from_hf(_load_files(folder, progress), cfg)
        check_state(found, cfg, state, f"{folder} (transformers layout)")
        return MMCheckpoint(found, cfg, d, state, source=folder.resolve(), hf_files=folder.resolve())

    from mmkit.models.wan import hf as wan_hf
    from mmkit.models.wan.config import WanConfig

    pipeline = (folder / "model_index.json").is_file()
    dit = folder / "transformer" if pipeline else folder
    source = (
        folder if pipeline else (folder.parent if (folder.parent / "model_index.json").is_file() else None)
    )
    sd = _load_files(dit, progress)
    layout = wan_hf.detect_layout(sd)
    d = read_json(dit / "config.json", "Wan transformer config")
    if layout == "original" or d.get("_class_name") == "WanModel":
        cfg = wan_hf.config_from_original(d, sd)
        d = cfg.to_dict()
    else:
        cfg = WanConfig.from_dict(d).validate()
    state = wan_hf.from_hf(sd) if layout == "diffusers" else wan_hf.from_original(sd)
    check_state(found, cfg, state, f"{dit} ({layout} layout)")
    return MMCheckpoint(found, cfg, d, state, source=source.resolve() if source else None)


def _layout_file(path: Path) -> Path | None:
    """layout.json of an mmkit checkpoint folder (also when `path` is its step_N folder)."""
    for d in (path, path.parent):
        if (d / LAYOUT_FILE).is_file():
            return d / LAYOUT_FILE
    return None


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
    Example: `ck = read_mm("ckpt/qwen_tp2pp2")`; `ck.state`, `ck.model_cfg`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"mmkit checkpoint not found: {p}")
    lf = _layout_file(p)
    if lf is None:
        return _read_training(p, family, init_from)
    meta = read_json(lf, "mmkit layout file")
    fmt = meta.get("format")
    if fmt not in (FORMAT_DCP, FORMAT_SPLIT):
        raise ValueError(f"{lf}: format={fmt!r} is not an mmkit layout ({FORMAT_DCP} or {FORMAT_SPLIT})")
    root = lf.parent
    ck_family = meta["family"]
    _check_family(ck_family, family, root)
    cfg = config_from_dict(ck_family, meta["model_config"])
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
            r: _load_files(root / rank_dir(*r), False)
            for r in tqdm(layout.ranks, desc="read shards", unit="rank", disable=not progress)
            if (root / rank_dir(*r)).is_dir()
        }
        state = merge_states(shards, layout, expected or None)
    else:
        state = _dcp_state(root)
    check_state(ck_family, cfg, state, str(root))
    source = Path(init_from) if init_from else (Path(meta["source"]) if meta.get("source") else None)
    hf_files = root / HF_FILES if (root / HF_FILES).is_dir() else None
    if init_from and ck_family == "qwen2_5_vl":
        hf_files = Path(init_from)
    return MMCheckpoint(ck_family, cfg, meta["model_config"], state, source=source, hf_files=hf_files)


def _dcp_state(path: Path) -> dict[str, torch.Tensor]:
    from mmkit.train.checkpoint import export_model_state
    from mmkit.train.ema import clean_name

    return {clean_name(k): v for k, v in export_model_state(path, "model").items()}


def _read_training(p: Path, family: str | None, init_from) -> MMCheckpoint:
    """A checkpoint `mmkit train` wrote: config from the run's model.init_from / flavor, weights from DCP."""
    from mmkit.convert.export import read_checkpoint_info

    info = read_checkpoint_info(p)
    _check_family(info.family, family, p)
    src = Path(init_from) if init_from else info.init_from
    if src is not None and not src.is_dir():
        raise FileNotFoundError(
            f"model.init_from of {info.config_file} ({src}) is not a folder; pass --init-from DIR: the HF "
            "folder the run started from (it holds the model config)"
        )
    if info.family == "wan":
        if src is None:
            raise ValueError(f"{info.config_file}: model.init_from is not set; pass --init-from DIR")
        d = read_json(src / "transformer" / "config.json", "Wan transformer config of model.init_from")
        cfg, hf_files = config_from_dict("wan", d), None
    elif src is not None:
        d = read_json(src / "config.json", "config of model.init_from")
        cfg, hf_files = config_from_dict("qwen2_5_vl", d), src
    else:  # a run from a named flavor
        from mmkit.models.qwen2_5_vl.config import flavor
        from mmkit.models.qwen2_5_vl.tiny import tiny_config

        cfg = tiny_config() if info.flavor == "tiny" else flavor(info.flavor)
        d, hf_files = cfg.to_hf_dict(), None
    state = _dcp_state(info.step_dir)
    check_state(info.family, cfg, state, str(info.step_dir))
    return MMCheckpoint(info.family, cfg, d, state, source=src, hf_files=hf_files)


def load_mm_state(path: str | os.PathLike) -> tuple[str, Any, dict[str, torch.Tensor]]:
    """(family, model config, full mmkit state dict) of any mmkit checkpoint: pre-split, converted, or trained.

    For `model.init_from` of mm checkpoints: the state loads with `model.load_state_dict(state)`.
    Example: `family, cfg, state = load_mm_state("ckpt/wan_tp2pp2")`.
    """
    ck = read_mm(path)
    return ck.family, ck.model_cfg, ck.state


def read_any(
    path: str | os.PathLike, family: str | None = None, init_from=None, progress=False
) -> MMCheckpoint:
    """An HF folder (`read_hf`) or an mmkit checkpoint (`read_mm`), whichever `path` is.

    Example: `ck = read_any("Wan2.1-T2V-1.3B-Diffusers")`; `ck = read_any("ckpt/wan_tp2")`.
    """
    p = Path(path)
    hf = p.is_dir() and _layout_file(p) is None and not (p / "train_state.json").is_file()
    hf = hf and ((p / "model_index.json").is_file() or (p / "config.json").is_file())
    if hf:
        ck = read_hf(p, family, progress)
        if init_from:
            ck.source = Path(init_from)
        return ck
    return read_mm(p, family=family, init_from=init_from, progress=progress)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _new_dir(out: Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside `out`, renamed into place only when complete."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} exists and is not empty; pass a new folder or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_side_files(src: Path, dst: Path) -> None:
    """The non-weight top-level files of a transformers folder (config, tokenizer, processor, templates)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def _tensor_index(state: dict[str, torch.Tensor], layout: Layout) -> dict:
    index = {}
    for k, v in sorted(state.items()):
        index[k] = {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        index[k]["tp_dim"] = layout_tp_dim(layout.family, k)
        index[k]["stage"] = stage_of(k, layout)
    return index


def _task(ck: MMCheckpoint) -> str:
    if ck.family == "qwen2_5_vl":
        return "sft"
    return "i2v" if ck.model_cfg.image_dim is not None else "t2v"


def _write_dcp(ck: MMCheckpoint, out: Path) -> None:
    """The state as step 0 of a training checkpoint, through the trainer's own `save_checkpoint`."""
    from mmkit.config import Config, save_resolved
    from mmkit.train.checkpoint import save_checkpoint

    state = dict(ck.state)
    if ck.family == "qwen2_5_vl" and ck.model_cfg.tie_word_embeddings:
        # DCP's safetensors writer refuses two names sharing memory: store the tied head as its own copy
        state["language.lm_head.weight"] = state["language.embed_tokens.weight"].clone()
    model = _meta_model(ck.family, ck.model_cfg)
    model.load_state_dict(state, strict=True, assign=True)  # the tensors themselves, no copy
    cfg = Config()
    cfg.model.family, cfg.model.task = ck.family, _task(ck)
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
) -> Path:
    """Write `ck` as an mmkit checkpoint in `layout`: DCP when tp = pp = 1, else per-rank pre-split folders.

    `out` must be new or empty; it appears only when complete. Returns `out`.
    Example: `write_mm(read_hf("Qwen2.5-VL-3B"), "ckpt/q", plan_layout("qwen2_5_vl", cfg, tp=2))`.
    """
    out = Path(out)
    split = layout.tp > 1 or layout.pp > 1
    meta = {"format": FORMAT_SPLIT if split else FORMAT_DCP, "version": FORMAT_VERSION, **layout.to_dict()}
    meta.update(names="global", model_config=ck.hf_config, source=str(ck.source) if ck.source else None)
    with _new_dir(out) as tmp:
        if ck.hf_files is not None:
            _copy_side_files(ck.hf_files, tmp / HF_FILES)
            meta["hf_files"] = HF_FILES
        if split:
            shards = split_state(ck.state, layout, progress=progress)
            meta["rank_dirs"] = "mp_rank_{tp:02d}_{pp:03d}"
            for r in tqdm(layout.ranks, desc="write shards", unit="rank", disable=not progress):
                save_state_dict(shards[r], tmp / rank_dir(*r), "model", max_shard_bytes)
        else:
            _write_dcp(ck, tmp)
        meta["tensors"] = _tensor_index(ck.state, layout)
        (tmp / LAYOUT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def write_hf(
    ck: MMCheckpoint,
    outdir: str | os.PathLike,
    *,
    layout: str | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    where: Path | None = None,
) -> Path:
    """Write `ck` as a Hugging Face folder, with the same writers as `export_to_hf` (mm-to-hf of a checkpoint).

    Wan: `layout` "diffusers" (default; a full pipeline, frozen parts copied from `ck.source`) or "original".
    Qwen2.5-VL: a transformers folder with the side files of `ck.hf_files` (or `tokenizer_from`).
    Example: `write_hf(read_mm("ckpt/q_tp2"), "Qwen-out")`.
    """
    from mmkit.convert.export import LAYOUTS, CheckpointInfo, _QwenExport, _WanExport

    layout = layout or LAYOUTS[ck.family][0]
    if layout not in LAYOUTS[ck.family]:
        raise ValueError(
            f"layout={layout!r} does not apply to family {ck.family!r}; choose one of {', '.join(LAYOUTS[ck.family])}"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)} (or leave unset)")
    where = where or Path(outdir)
    init = ck.hf_files if ck.family == "qwen2_5_vl" and ck.hf_files is not None else ck.source
    if ck.family == "qwen2_5_vl" and init is None:
        raise ValueError(
            f"{where}: no config/tokenizer files are recorded for this Qwen2.5-VL checkpoint (its run started "
            "from a flavor); pass --init-from DIR, a Qwen2.5-VL folder with config.json and tokenizer files"
        )
    info = CheckpointInfo(
        step_dir=where,
        step=0,
        config_file=where / LAYOUT_FILE,
        family=ck.family,
        task=_task(ck),
        flavor="",
        init_from=init,
        has_ema=False,
    )
    plan = _WanExport(info, layout) if ck.family == "wan" else _QwenExport(info, tokenizer_from)
    plan.check(ck.state)
    with _new_dir(Path(outdir)) as tmp:
        plan.write(ck.state, tmp, DTYPES[dtype] if dtype else None, max_shard_bytes, progress)
    return Path(outdir)


# ---------------------------------------------------------------------------------------------------
# The three operations behind `mmkit convert` and `mm-convert`
# ---------------------------------------------------------------------------------------------------
def hf_to_mm(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int | None = None,
    pp_layers=None,
    vit_pp_layers=None,
    family: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    names: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Hugging Face folder -> mmkit checkpoint, unsplit (DCP) or pre-split for a tp/pp layout.

    The layout is validated against the model config before any tensor is read. `dtype` casts floating
    tensors (fp32 / bf16 / fp16; default: as stored). Returns `out`.
    Example: `hf_to_mm("Qwen2.5-VL-7B-Instruct", "ckpt/q", tp=2, pp_layers=[[12, 16]], vit_pp_layers=[[32, 0]])`.
    """
    hf_dir = Path(hf_dir)
    found = detect_family(hf_dir)
    _check_family(found, family, hf_dir)
    cfg, ck = _hf_config(hf_dir, found)
    layout = plan_layout(
        found, cfg, tp=tp, pp=pp, pp_layers=pp_layers, vit_pp_layers=vit_pp_layers, names=names
    )
    _check_out(out)
    ck = ck or read_hf(hf_dir, found, progress)
    ck.state = _cast(ck.state, dtype)
    return write_mm(ck, out, layout, max_shard_bytes=max_shard_bytes, progress=progress)


def _hf_config(folder: Path, family: str) -> tuple[Any, MMCheckpoint | None]:
    """The model config of an HF folder, read without its weights where the config file suffices (an
    original-release Wan config lacks some widths: then the folder is read whole, and returned too)."""
    if family == "qwen2_5_vl":
        return config_from_dict(family, read_json(folder / "config.json")), None
    dit = folder / "transformer" if (folder / "model_index.json").is_file() else folder
    d = read_json(dit / "config.json", "Wan transformer config")
    if d.get("_class_name") == "WanModel":
        ck = read_hf(folder, family)
        return ck.model_cfg, ck
    return config_from_dict(family, d), None


def _check_out(out) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} exists and is not empty; pass a new folder or remove it")


def resplit(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int | None = None,
    pp_layers=None,
    vit_pp_layers=None,
    family: str | None = None,
    init_from: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    names: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Any mmkit checkpoint (pre-split, DCP, training) -> the same weights in another tp/pp layout.

    tp = pp = 1 writes the unsplit DCP format. Returns `out`.
    Example: `resplit("ckpt/q_tp2pp2", "ckpt/q_tp1pp1")`.
    """
    _check_out(out)
    ck = read_any(src, family, init_from, progress)
    layout = plan_layout(
        ck.family, ck.model_cfg, tp=tp, pp=pp, pp_layers=pp_layers, vit_pp_layers=vit_pp_layers, names=names
    )
    return write_mm(ck, out, layout, max_shard_bytes=max_shard_bytes, progress=progress)


def check_source_layout(
    src: str | os.PathLike, *, tp: int | None = None, pp_layers=None, labels: dict[str, str] | None = None
) -> None:
    """A source layout the user states (MindSpeed's source_parallel_config) must be the one on disk.

    mmkit reads the source layout from the checkpoint's layout.json (a checkpoint without one is unsplit);
    a stated `tp` / `pp_layers` that differs is an error naming the field (`labels`: {"tp": ..., "pp_layers": ...}).
    Example: `check_source_layout("ckpt/q", tp=2, pp_layers=[[1, 1]])`.
    """
    labels = labels or {}
    lf = _layout_file(Path(src))
    have = Layout.from_dict(read_json(lf)) if lf else Layout("", 1, 1, [])
    where = f"{src} was written with" + ("" if lf else " (an unsplit checkpoint)")
    fix = "mmkit reads the source layout from disk: drop the field or correct it"
    if tp is not None and tp != have.tp:
        raise LayoutError(f"{labels.get('tp', 'source tp')}={tp}: {where} tp={have.tp}; {fix}")
    if pp_layers is not None:
        stages = [int(x) for r in pp_layers for x in (r if isinstance(r, (list, tuple)) else [r])]
        if (len(stages) > 1 or len(have.stages) > 1) and stages != have.stages:
            label = labels.get("pp_layers", "source pp_layers")
            raise LayoutError(f"{label}={pp_layers}: {where} stage layers {have.stages}; {fix}")


def mm_to_hf(
    src: str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    which: str = "model",
    layout: str | None = None,
    init_from: str | os.PathLike | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    family: str | None = None,
    progress: bool = True,
) -> Path:
    """Any mmkit checkpoint -> a Hugging Face folder. A training checkpoint goes through `export_to_hf`
    (EMA, original layout, ...); a converted one (layout.json) is merged first, then written the same way.

    `init_from` replaces the recorded HF source (Wan: the pipeline with the frozen parts; Qwen: the folder
    with config/tokenizer files). Returns `outdir`.
    Example: `mm_to_hf("ckpt/q_tp2pp2", "Qwen-out")` then `Qwen2_5_VLForConditionalGeneration.from_pretrained("Qwen-out")`.
    """
    p = Path(src)
    if _layout_file(p) is None:
        from mmkit.convert.export import export_to_hf

        if family is not None:
            from mmkit.convert.export import read_checkpoint_info

            _check_family(read_checkpoint_info(p).family, family, p)
        return export_to_hf(
            p,
            outdir,
            which=which,
            layout=layout,
            init_from=init_from,
            tokenizer_from=tokenizer_from,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
    if which != "model":
        raise ValueError(f"{p} is a converted checkpoint: it holds no EMA weights; drop --ema")
    _check_out(outdir)
    ck = read_mm(p, family=family, init_from=init_from, progress=progress)
    return write_hf(
        ck,
        outdir,
        layout=layout,
        tokenizer_from=tokenizer_from,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        where=p,
    )
