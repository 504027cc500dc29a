"""What every checkpoint format shares: one model's full state in memory (`MMCheckpoint`), the checks
and casts applied to it, and the atomic output folder every writer builds in.

Example:
    >>> check_state("wan", cfg, state, "ckpt/wan")          # names and shapes of the model, or one error
    >>> with new_dir(Path("out"), "convert resplit") as tmp:  # `out` appears only when complete
    ...     (tmp / "a.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmkit import registry
from mmkit.device import DTYPES
from mmkit.models.common.hf_io import check_keys
from mmkit.outputs import check_output_dir, mark_output_dir


@dataclass
class MMCheckpoint:
    """One model's full mmkit state plus what is needed to write it back out as a Hugging Face folder."""

    family: str  # a registry family name, e.g. "wan"
    model_cfg: Any  # the family's model config
    hf_config: dict  # the HF config.json dict (diffusers transformer config / transformers config)
    state: dict[str, torch.Tensor]  # mmkit names, full (unsplit) tensors
    source: Path | None = None  # the HF folder it came from (Wan: the pipeline with the frozen parts)
    hf_files: Path | None = None  # a folder whose side files (config, tokenizer, processor) travel with it


def adapter(family: str):
    """The HF adapter of `family` (`FamilySpec.hf`). Example: `adapter("wan").task(cfg)` -> `"t2v"`."""
    return registry.get(family).resolve("hf")


def check_family(found: str, want: str | None, where: Path) -> None:
    """A checkpoint of family `found` where the caller asked for `want` (None: any) is an error."""
    if want is not None and want != found:
        raise ValueError(f"{where} holds a {found} model, not {want}; use the {found} converter")


def model_shapes(family: str, cfg) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the mmkit model a config describes (built on the meta device, no memory).

    Example: `model_shapes("wan", WanConfig(num_layers=2))["blocks.1.attn.q.weight"]` -> `(1536, 1536)`.
    """
    with torch.device("meta"):
        model = registry.get(family).build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(family: str, cfg, state: dict[str, torch.Tensor], where: str, fix: str = "") -> None:
    """Raise one clear error unless `state` has exactly the model's names and shapes; `fix` ends the message.

    Example: `check_state("qwen2_5_vl", cfg, state, "ckpt/q")`.
    """
    want = model_shapes(family, cfg)
    check_keys(want, state, where)
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {s}"
        for k, s in want.items()
        if tuple(state[k].shape) != s
    ]
    if wrong:
        raise ValueError(
            f"{where}: {len(wrong)} tensor shape(s) differ from the config, e.g. {'; '.join(wrong[:3])}"
            + (f". {fix}" if fix else "")
        )


def check_finite(state: dict[str, torch.Tensor], where: str, allow: bool = False) -> None:
    """Refuse weights holding NaN/inf (a diverged run) unless `allow` (`--allow-nonfinite`).

    Example: `check_finite(sd, "ckpt/step_8")`.
    """
    from mmkit.checkpoint.dcp import nonfinite_names

    bad = nonfinite_names(state, limit=3)
    if not bad:
        return
    if allow:
        import warnings

        warnings.warn(f"{where}: exporting weights that hold NaN/inf ({', '.join(bad)})", stacklevel=2)
        return
    raise ValueError(
        f"{where}: the weights hold NaN/inf (e.g. {', '.join(bad)}), from a diverged run; export an earlier "
        "step_N folder, or pass --allow-nonfinite to export them anyway"
    )


def check_dtype(dtype: str | None) -> torch.dtype | None:
    """The torch dtype of a `--dtype` name (fp32 / bf16 / fp16), None for "as stored"."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)} (or leave unset)")
    return DTYPES[dtype] if dtype is not None else None


def cast(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """`state` with its floating tensors cast to `dtype` (a `--dtype` name); unchanged for None."""
    to = check_dtype(dtype)
    if to is None:
        return state
    return {k: v.to(to) if v.is_floating_point() else v for k, v in state.items()}


def check_out(out: str | os.PathLike, command: str, overwrite: bool = False) -> None:
    """Refuse `out` before any weights are read unless it is new, empty, or (with `overwrite`) the marked
    output of an earlier mmkit command; a user's non-empty folder is always refused (`outputs.check_output_dir`).

    Example: `check_out("ckpt/q", "convert hf-to-mm", overwrite=args.overwrite)`.
    """
    check_output_dir(out, command, overwrite)


@contextlib.contextmanager
def new_dir(out: str | os.PathLike, command: str, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside `out`, marked as `command`'s output, and swap it into
    place only when complete.

    `out` is checked first (`check_out`). An earlier marked output is replaced only with `overwrite`, and
    so that a crash at any point keeps it: it is renamed aside, the new folder renamed in, and only then
    is the old one deleted.
    Example:
        >>> with new_dir(Path("ckpt/q"), "convert hf-to-mm", overwrite=True) as tmp:
        ...     (tmp / "layout.json").write_text("{}")
    """
    out = Path(out)
    check_out(out, command, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        mark_output_dir(tmp, command)
        # checked again: the writing took a while, and `out` may have changed meanwhile
        replace = check_output_dir(out, command, overwrite)
        if replace:
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
        elif out.exists():
            out.rmdir()  # empty, checked above
        try:
            os.rename(tmp, out)
        except BaseException:
            if replace:
                os.rename(old, out)  # the earlier output goes back where it was
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace:
        shutil.rmtree(old, ignore_errors=True)
