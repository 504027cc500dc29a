"""mmkit training checkpoint (DCP) -> a Hugging Face folder that diffusers / transformers load.

`export_to_hf(ckpt, outdir)` reads the run's `config.toml` beside the checkpoint to learn the model
family, then writes with that family's HF adapter (`FamilySpec.hf`):
- **wan**, layout `diffusers` (default): a complete diffusers pipeline folder. The trained DiT becomes
  `transformer/` (sharded safetensors + index, the `config.json` of the folder the run started from);
  the frozen parts (vae, text_encoder, tokenizer, scheduler, and for i2v image_encoder /
  image_processor) and `model_index.json` are copied from `model.init_from`.
  Layout `original`: only the DiT, in the original Wan2.1 release layout (`WanModel` config.json).
- **qwen2_5_vl**, layout `transformers`: config.json, sharded safetensors + model.safetensors.index.json,
  and the tokenizer / chat template / preprocessor / generation files copied from `model.init_from`
  (or from `tokenizer_from`). A run that started from a named flavor without `init_from` gets its
  config.json from the flavor, and needs `tokenizer_from` for the tokenizer files.

Everything is checked before any tensor is read: the checkpoint's files, its family, the layout, the
source folders, and EMA presence. The tensors are then checked name by name and shape by shape
against the architecture the export declares, so a folder that would not load is never written.
The folder is assembled under a temporary name beside `outdir` and renamed into place at the end.

Converted checkpoints (layout.json) go through `ops.mm_to_hf`, which uses the same writers.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmkit.checkpoint.common import (
    adapter,
    check_dtype,
    check_family,
    check_finite,
    check_out,
    check_state,
    new_dir,
)
from mmkit.checkpoint.dcp import export_model_state, read_checkpoint_info
from mmkit.checkpoint.hf import CONFIG_SOURCE_FIX, hf_layout
from mmkit.models.common.hf_io import DEFAULT_SHARD_BYTES

COMMAND = "convert mm-to-hf"  # the marker of the folders it writes


def export_to_hf(
    ckpt: str | os.PathLike,
    outdir: str | os.PathLike,
    which: str = "model",
    layout: str | None = None,
    *,
    init_from: str | os.PathLike | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    family: str | None = None,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the weights of checkpoint `ckpt` as a Hugging Face folder `outdir` (must be new or empty,
    or with `overwrite` an earlier mmkit output, replaced only once the new folder is complete).

    `which`: "model" (the trained weights) or "ema" (the run's EMA weights). `layout`: wan "diffusers"
    (default, a full pipeline folder) or "original" (the DiT alone, original Wan2.1 names);
    qwen2_5_vl "transformers". `init_from` replaces the run's `model.init_from` (the source of the
    frozen components / tokenizer, e.g. when that folder moved); `tokenizer_from` supplies Qwen's
    tokenizer files. `dtype`: None keeps the checkpoint's (fp32 master weights), or fp32 / bf16 / fp16.
    `family` refuses a checkpoint of another family. Weights holding NaN/inf are refused unless
    `allow_nonfinite`. Returns `outdir`.
    Example: `export_to_hf("outputs/ckpt/wan_t2v_tiny", "outputs/wan-trained")` then
    `diffusers.WanPipeline.from_pretrained("outputs/wan-trained")`.
    """
    out = Path(outdir)
    check_out(out, COMMAND, overwrite)  # first: nothing is read for a target that is refused
    if which not in ("model", "ema"):
        raise ValueError(f"which={which!r}: use 'model' (trained weights) or 'ema' (the EMA weights)")
    to = check_dtype(dtype)
    if max_shard_bytes < 1:
        raise ValueError(f"max shard size {max_shard_bytes} bytes: must be positive, e.g. 5GB")
    info = read_checkpoint_info(ckpt)
    check_family(info.family, family, Path(ckpt))
    layout = hf_layout(info.family, layout)
    if which == "ema" and not info.has_ema:
        raise ValueError(
            f"checkpoint {info.step_dir} has no EMA weights (the run had train.ema=false); "
            "export the trained weights instead (drop --ema / which='ema')"
        )
    writer = adapter(info.family).writer(
        Path(init_from) if init_from is not None else info.init_from,
        layout=layout,
        task=info.task,
        flavor=info.flavor,
        tokenizer_from=tokenizer_from,
        config_file=info.config_file,
    )
    # Everything the user can get wrong was checked above; only now are the tensors read.
    # (Names need no cleaning: DCP saved them without wrapper prefixes, the EMA keeps clean names.)
    sd = export_model_state(info.step_dir, which)
    check_finite(sd, str(info.step_dir), allow_nonfinite)
    check_state(info.family, writer.cfg, sd, writer.checked_against, CONFIG_SOURCE_FIX)
    with new_dir(out, COMMAND, overwrite) as tmp:
        writer.write(sd, tmp, to, max_shard_bytes, progress)
    return out
