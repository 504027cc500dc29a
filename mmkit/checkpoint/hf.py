"""Hugging Face folders as mmkit checkpoints: read one into a full mmkit state, write one back out.

The family is asked of the registry (`registry.detect(folder)`: each spec recognises its own
model_index.json `_class_name` / config.json `model_type`), and everything family-specific (the
folder layout, name maps, the config, frozen parts or tokenizer side files) is the family's HF
adapter, `FamilySpec.hf` (e.g. `mmkit.models.wan.hf:ADAPTER`). An adapter provides:

- `read_config(folder)` -> (config, config.json dict), or None when the weights are needed to know it;
- `read(folder, progress, config)` -> `HFModel` (mmkit-named state, config, the source folder);
- `run_config(src, flavor, config_file)` -> (config, dict) of a training run from its init_from / flavor;
- `writer(src, layout=, task=, flavor=, tokenizer_from=, config_file=)` -> an object with `cfg`,
  `checked_against` and `write(state, out, dtype, max_shard_bytes, progress)`, built (and every source
  file checked) before any tensor is read;
- `task(cfg)`, `tied` (LM head, embedding) names or None, `side_files` (tokenizer files travel along).

Example:
    >>> ck = read_hf("Qwen2.5-VL-3B-Instruct")            # MMCheckpoint; ck.state["language.norm.weight"]
    >>> write_hf(ck, "Qwen-again")
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mmkit import registry
from mmkit.checkpoint.common import (
    MMCheckpoint,
    adapter,
    check_dtype,
    check_family,
    check_state,
    new_dir,
)
from mmkit.checkpoint.mm import LAYOUT_FILE
from mmkit.models.common.hf_io import DEFAULT_SHARD_BYTES

_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?)(|B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
# appended to a shape mismatch found while exporting: the config came from somewhere else than the weights
CONFIG_SOURCE_FIX = (
    "The config source (model.init_from / model.flavor / --init-from) is not the model that was trained"
)


def parse_size(text: str | int) -> int:
    """A shard size as bytes: an int, or text like "5GB", "500MB", "2GiB", "1024".

    Example: `parse_size("5GB")` -> `5_000_000_000`; `parse_size("2GiB")` -> `2_147_483_648`.
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.fullmatch(text.strip().upper().replace(" ", ""))
    if m is None:
        raise ValueError(f"shard size {text!r}: expected bytes or a size like 5GB, 500MB, 2GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def hf_layout(family: str, layout: str | None) -> str:
    """The HF layout to write (`layout`, default the family's first); an error if the family has no such.

    Example: `hf_layout("wan", None)` -> `"diffusers"`.
    """
    layouts = registry.get(family).hf_layouts
    layout = layout or layouts[0]
    if layout not in layouts:
        raise ValueError(
            f"layout={layout!r} does not apply to model.family={family!r}; choose one of {', '.join(layouts)}"
        )
    return layout


def read_hf_config(folder: str | os.PathLike, family: str | None = None):
    """(family, (config, config.json dict) or None) of an HF folder, without reading its weights (None:
    this folder's config is only known with its weights). `family` refuses another family.

    Example: `family, (cfg, d) = read_hf_config("Qwen2.5-VL-3B-Instruct")`.
    """
    folder = Path(folder)
    found = registry.detect(folder).name
    check_family(found, family, folder)
    return found, adapter(found).read_config(folder)


def read_hf(
    folder: str | os.PathLike, family: str | None = None, progress: bool = False, config=None
) -> MMCheckpoint:
    """A Hugging Face folder as a full mmkit state (names mapped by the family's adapter), checked.

    Wan: a diffusers pipeline folder, its `transformer/` folder, or an original-release DiT folder.
    Qwen2.5-VL: a transformers folder (either key layout). `family` refuses another family; `config` =
    `read_hf_config(folder)` when the caller already detected the family and read the config (neither is
    read again).
    Example: `ck = read_hf("Qwen2.5-VL-3B-Instruct")`; `ck.state["language.norm.weight"]`.
    """
    folder = Path(folder)
    if config is not None:
        family, config = config
    found = family if config is not None else registry.detect(folder).name
    check_family(found, family, folder)
    m = adapter(found).read(folder, progress, config)
    check_state(found, m.cfg, m.state, m.where)
    return MMCheckpoint(found, m.cfg, m.hf_config, m.state, source=m.source, hf_files=m.hf_files)


def write_hf(
    ck: MMCheckpoint,
    outdir: str | os.PathLike,
    *,
    layout: str | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    config_file: Path | None = None,
    command: str = "convert",
    overwrite: bool = False,
) -> Path:
    """Write `ck` as a Hugging Face folder, with the writer `export_to_hf` uses for training checkpoints.

    Wan: `layout` "diffusers" (default; a full pipeline, frozen parts copied from `ck.source`) or "original".
    Qwen2.5-VL: a transformers folder with the side files of `ck.hf_files` (or `tokenizer_from`).
    `config_file` names the checkpoint's layout file in messages. `outdir` appears only when complete, marked as `command`'s output; an earlier
    mmkit output there is replaced only with `overwrite` (`new_dir`).
    Example: `write_hf(read_mm("ckpt/q_tp2"), "Qwen-out")`.
    """
    layout = hf_layout(ck.family, layout)
    to = check_dtype(dtype)
    ad = adapter(ck.family)
    writer = ad.writer(
        ck.hf_files if ck.hf_files is not None else ck.source,
        layout=layout,
        task=ad.task(ck.model_cfg),
        flavor=None,  # a converted checkpoint records no flavor: its config comes from the source folder
        tokenizer_from=tokenizer_from,
        config_file=config_file or Path(outdir) / LAYOUT_FILE,
    )
    check_state(ck.family, writer.cfg, ck.state, writer.checked_against, CONFIG_SOURCE_FIX)
    with new_dir(Path(outdir), command, overwrite) as tmp:
        writer.write(ck.state, tmp, to, max_shard_bytes, progress)
    return Path(outdir)
