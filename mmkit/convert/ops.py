"""The conversions behind `mmkit convert` and `mm-convert`: hf-to-mm, resplit, mm-to-hf.

Each reads its source once and writes a new folder that appears only when complete. The formats are
`mmkit.checkpoint`'s (HF folders through each family's adapter, the unsplit DCP and the pre-split
per-rank layouts, training checkpoints); the tp/pp layout is validated against the model config, with
the rules training applies, before any tensor is read.

Example:
    >>> hf_to_mm("Qwen2.5-VL-7B-Instruct", "ckpt/qwen_tp2pp2", tp=2, pp_layers=[14, 14])
    >>> resplit("ckpt/qwen_tp2pp2", "ckpt/qwen_unsplit")                      # tp1 pp1 -> DCP
    >>> mm_to_hf("ckpt/qwen_unsplit", "Qwen2.5-VL-7B-again")
"""

from __future__ import annotations

import os
from pathlib import Path

from mmkit.checkpoint.common import MMCheckpoint, cast, check_finite, check_out
from mmkit.checkpoint.hf import read_hf, read_hf_config, write_hf
from mmkit.checkpoint.layouts import Layout, LayoutError, plan_layout
from mmkit.checkpoint.mm import LAYOUT_FILE, layout_file, read_mm, write_mm
from mmkit.models.common.hf_io import DEFAULT_SHARD_BYTES, read_json


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
    overwrite: bool = False,
) -> Path:
    """Hugging Face folder -> mmkit checkpoint, unsplit (DCP) or pre-split for a tp/pp layout.

    The layout is validated against the model config before any tensor is read (an original-release Wan
    folder, whose config needs its weights, is read first). `dtype` casts floating tensors (fp32 / bf16 /
    fp16; default: as stored). `family` refuses another family. `overwrite` replaces an earlier mmkit output
    at `out` (never a user's folder). Returns `out`.
    Example: `hf_to_mm("Qwen2.5-VL-7B-Instruct", "ckpt/q", tp=2, pp_layers=[[12, 16]], vit_pp_layers=[[32, 0]])`.
    """
    check_out(out, "convert hf-to-mm", overwrite)  # first: nothing is read for a target that is refused
    hf_dir = Path(hf_dir)
    found, config = read_hf_config(hf_dir, family)
    ck = None if config is not None else read_hf(hf_dir, found, progress)
    cfg = config[0] if config is not None else ck.model_cfg
    layout = plan_layout(
        found, cfg, tp=tp, pp=pp, pp_layers=pp_layers, vit_pp_layers=vit_pp_layers, names=names
    )
    ck = ck or read_hf(hf_dir, progress=progress, config=(found, config))
    ck.state = cast(ck.state, dtype)
    return write_mm(
        ck,
        out,
        layout,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        command="convert hf-to-mm",
        overwrite=overwrite,
    )


def read_any(
    path: str | os.PathLike, family: str | None = None, init_from=None, progress=False
) -> MMCheckpoint:
    """An HF folder (`read_hf`) or an mmkit checkpoint (`read_mm`), whichever `path` is.

    Example: `ck = read_any("Wan2.1-T2V-1.3B-Diffusers")`; `ck = read_any("ckpt/wan_tp2")`.
    """
    p = Path(path)
    hf = p.is_dir() and layout_file(p) is None and not (p / "train_state.json").is_file()
    hf = hf and ((p / "model_index.json").is_file() or (p / "config.json").is_file())
    if hf:
        ck = read_hf(p, family, progress)
        if init_from:
            ck.source = Path(init_from)
        return ck
    return read_mm(p, family=family, init_from=init_from, progress=progress)


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
    overwrite: bool = False,
) -> Path:
    """Any mmkit checkpoint (pre-split, DCP, training) -> the same weights in another tp/pp layout.

    tp = pp = 1 writes the unsplit DCP format. `overwrite` replaces an earlier mmkit output at `out`.
    Returns `out`.
    Example: `resplit("ckpt/q_tp2pp2", "ckpt/q_tp1pp1")`.
    """
    check_out(out, "convert resplit", overwrite)
    ck = read_any(src, family, init_from, progress)
    layout = plan_layout(
        ck.family, ck.model_cfg, tp=tp, pp=pp, pp_layers=pp_layers, vit_pp_layers=vit_pp_layers, names=names
    )
    return write_mm(
        ck,
        out,
        layout,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        command="convert resplit",
        overwrite=overwrite,
    )


def check_source_layout(
    src: str | os.PathLike, *, tp: int | None = None, pp_layers=None, labels: dict[str, str] | None = None
) -> None:
    """A source layout the user states (MindSpeed's source_parallel_config) must be the one on disk.

    mmkit reads the source layout from the checkpoint's layout.json (a checkpoint without one is unsplit);
    a stated `tp` / `pp_layers` that differs is an error naming the field (`labels`: {"tp": ..., "pp_layers": ...}).
    Example: `check_source_layout("ckpt/q", tp=2, pp_layers=[[1, 1]])`.
    """
    labels = labels or {}
    lf = layout_file(Path(src))
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
    allow_nonfinite: bool = False,
    overwrite: bool = False,
) -> Path:
    """Any mmkit checkpoint -> a Hugging Face folder. A training checkpoint goes through `export_to_hf`
    (EMA, original layout, ...); a converted one (layout.json) is merged first, then written the same way.

    `init_from` replaces the recorded HF source (Wan: the pipeline with the frozen parts; Qwen: the folder
    with config/tokenizer files). `overwrite` replaces an earlier mmkit output at `outdir`. Returns `outdir`.
    Example: `mm_to_hf("ckpt/q_tp2pp2", "Qwen-out")` then `Qwen2_5_VLForConditionalGeneration.from_pretrained("Qwen-out")`.
    """
    check_out(outdir, "convert mm-to-hf", overwrite)  # first: nothing is read for a target that is refused
    p = Path(src)
    if layout_file(p) is None:
        from mmkit.convert.export import export_to_hf

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
            family=family,
            allow_nonfinite=allow_nonfinite,
            overwrite=overwrite,
        )
    if which != "model":
        raise ValueError(f"{p} is a converted checkpoint: it holds no EMA weights; drop --ema")
    ck = read_mm(p, family=family, init_from=init_from, progress=progress)
    check_finite(ck.state, str(p), allow_nonfinite)
    return write_hf(
        ck,
        outdir,
        layout=layout,
        tokenizer_from=tokenizer_from,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        config_file=p / LAYOUT_FILE,
        command="convert mm-to-hf",
        overwrite=overwrite,
    )
