"""mmkit training checkpoint (DCP) -> a Hugging Face folder that diffusers / transformers load.

`export_to_hf(ckpt, outdir)` reads the run's `config.toml` beside the checkpoint to learn the model
family, then writes:
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

Not here: HF -> mmkit checkpoints, re-splitting parallel layouts, VAE conversion (later `convert/` files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmkit.models.common.hf_io import check_keys, read_json, save_state_dict

FAMILIES = ("wan", "qwen2_5_vl")
# family -> accepted layouts; the first is the default.
LAYOUTS = {"wan": ("diffusers", "original"), "qwen2_5_vl": ("transformers",)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIT_STEM = "diffusion_pytorch_model"  # diffusers' weight file name
DEFAULT_SHARD_BYTES = 5 * 1024**3  # the Hugging Face default max_shard_size ("5GB")
# Files that hold weights: never copied from a source folder (the export writes its own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".index.json")
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?)(|B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class CheckpointInfo:
    """What an mmkit training checkpoint holds, read from its small files (no tensors loaded)."""

    step_dir: Path  # the step_N folder
    step: int
    config_file: Path  # the run's resolved config.toml
    family: str
    task: str
    flavor: str
    init_from: Path | None  # as the run config names it (may no longer exist)
    has_ema: bool


def read_checkpoint_info(ckpt: str | os.PathLike) -> CheckpointInfo:
    """Check that `ckpt` is an mmkit checkpoint (a step_N folder or a checkpoint.dir) and describe it.

    Raises FileNotFoundError naming the missing file, ValueError for an unknown family.
    Example: `info = read_checkpoint_info("outputs/ckpt/wan_t2v_tiny")`; `info.family, info.step`.
    """
    from mmkit.config import read_config_file
    from mmkit.train.checkpoint import find_latest

    p = Path(ckpt)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if (p / "train_state.json").is_file():
        step_dir = p
    else:
        step_dir = find_latest(p) if p.is_dir() else None
        if step_dir is None:
            raise FileNotFoundError(
                f"{p} is not an mmkit checkpoint: it has no train_state.json (a step_N folder) and no "
                "`latest` pointer or step_N folders (a checkpoint.dir). Pass the checkpoint.dir of the "
                "`mmkit train` run, or one of its step_N folders"
            )
    dcp_dir = step_dir / "dcp"
    if not dcp_dir.is_dir() or not any(dcp_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"checkpoint {step_dir} is incomplete: {dcp_dir} holds no DCP tensor shards (*.safetensors); "
            "export an earlier step_N folder"
        )
    config_file = next(
        (d / "config.toml" for d in (step_dir, step_dir.parent) if (d / "config.toml").is_file()), None
    )
    if config_file is None:
        raise FileNotFoundError(
            f"checkpoint {step_dir}: no config.toml in it or in {step_dir.parent}; the export needs the run's "
            "resolved config (model.family, model.init_from). Copy the run's config.toml into the step folder"
        )
    model = read_config_file(config_file).get("model", {})
    family = model.get("family", "wan")
    if family not in FAMILIES:
        raise ValueError(
            f"{config_file}: model.family={family!r} has no HF exporter; supported: {', '.join(FAMILIES)}"
        )
    state = read_json(step_dir / "train_state.json", "checkpoint train state")
    init_from = model.get("init_from")
    return CheckpointInfo(
        step_dir=step_dir,
        step=int(state.get("step", 0)),
        config_file=config_file,
        family=family,
        task=model.get("task", "t2v" if family == "wan" else "sft"),
        flavor=model.get("flavor", "tiny"),
        init_from=Path(init_from) if init_from else None,
        has_ema=bool(state.get("has_ema", False)),
    )


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
) -> Path:
    """Write the weights of checkpoint `ckpt` as a Hugging Face folder `outdir` (must be new or empty).

    `which`: "model" (the trained weights) or "ema" (the run's EMA weights). `layout`: wan "diffusers"
    (default, a full pipeline folder) or "original" (the DiT alone, original Wan2.1 names);
    qwen2_5_vl "transformers". `init_from` replaces the run's `model.init_from` (the source of the
    frozen components / tokenizer, e.g. when that folder moved); `tokenizer_from` supplies Qwen's
    tokenizer files. `dtype`: None keeps the checkpoint's (fp32 master weights), or fp32 / bf16 / fp16.
    Returns `outdir`.
    Example: `export_to_hf("outputs/ckpt/wan_t2v_tiny", "outputs/wan-trained")` then
    `diffusers.WanPipeline.from_pretrained("outputs/wan-trained")`.
    """
    if which not in ("model", "ema"):
        raise ValueError(f"which={which!r}: use 'model' (trained weights) or 'ema' (the EMA weights)")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)} (or leave unset)")
    if max_shard_bytes < 1:
        raise ValueError(f"max shard size {max_shard_bytes} bytes: must be positive, e.g. 5GB")
    info = read_checkpoint_info(ckpt)
    layout = layout or LAYOUTS[info.family][0]
    if layout not in LAYOUTS[info.family]:
        raise ValueError(
            f"layout={layout!r} does not apply to model.family={info.family!r}; "
            f"choose one of {', '.join(LAYOUTS[info.family])}"
        )
    if which == "ema" and not info.has_ema:
        raise ValueError(
            f"checkpoint {info.step_dir} has no EMA weights (the run had train.ema=false); "
            "export the trained weights instead (drop --ema / which='ema')"
        )
    out = Path(outdir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} exists and is not empty; pass a new folder or remove it")
    if init_from is not None:
        info.init_from = Path(init_from)
    plan = _WanExport(info, layout) if info.family == "wan" else _QwenExport(info, tokenizer_from)

    from mmkit.train.checkpoint import export_model_state
    from mmkit.train.ema import clean_name

    # Everything the user can get wrong was checked above; only now are the tensors read.
    sd = {clean_name(k): v for k, v in export_model_state(info.step_dir, which).items()}
    plan.check(sd)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plan.write(sd, tmp, DTYPES[dtype] if dtype else None, max_shard_bytes, progress)
        if out.exists():
            out.rmdir()  # an empty folder, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------
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


def _check_shapes(want: dict[str, torch.Size], sd: dict[str, torch.Tensor], where: str) -> None:
    """The checkpoint's tensors must be exactly the architecture's: same names, same shapes."""
    check_keys(want, sd, where)
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(s)}"
        for k, s in want.items()
        if sd[k].shape != s
    ]
    if wrong:
        raise ValueError(
            f"{where}: {len(wrong)} tensor shape(s) differ from the config, e.g. {'; '.join(wrong[:3])}. "
            "The config source (model.init_from / model.flavor / --init-from) is not the model that was trained"
        )


def _need_folder(path: Path | None, what: str, fix: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is not set; {fix}")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}; {fix}")
    return path


def _dtype_name(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> str:
    """The `dtype` entry of a transformers config.json: what the floating tensors are written as."""
    if dtype is None:
        dtype = next(v.dtype for v in sd.values() if v.is_floating_point())
    return str(dtype).removeprefix("torch.")


def _copy_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the non-weight top-level files of `src` (tokenizer, chat template, processor configs)."""
    copied = []
    for f in sorted(src.iterdir()):
        if (
            f.is_file()
            and not f.name.startswith(".")
            and f.name not in skip
            and not f.name.endswith(_WEIGHT_SUFFIXES)
        ):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


# ---------------------------------------------------------------------------------------------------
# Wan2.1
# ---------------------------------------------------------------------------------------------------
class _WanExport:
    """Wan DiT checkpoint -> diffusers pipeline folder (or the DiT alone in the original layout)."""

    def __init__(self, info: CheckpointInfo, layout: str):
        from mmkit.models.wan.config import WanConfig

        self.layout = layout
        fix = "pass --init-from DIR (init_from=...): the diffusers Wan folder the run started from"
        self.src = _need_folder(info.init_from, f"model.init_from of {info.config_file}", fix)
        self.index = read_json(
            self.src / "model_index.json", "pipeline index (model_index.json) of model.init_from"
        )
        # components = model_index entries of the form [library, class]; transformer is the trained part
        self.components = [k for k, v in self.index.items() if isinstance(v, list) and k != "transformer"]
        missing = [c for c in self.components if not (self.src / c).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{self.src}: model_index.json lists component folder(s) {missing} that are missing"
            )
        self.dit_config = read_json(self.src / "transformer" / "config.json", "Wan transformer config")
        self.cfg = WanConfig.from_dict(self.dit_config)
        needs_image = info.task == "i2v"
        if needs_image != (self.cfg.image_dim is not None):
            raise ValueError(
                f"{info.config_file}: model.task={info.task!r} but {self.src}/transformer is a "
                f"{'t2v' if self.cfg.image_dim is None else 'i2v'} DiT; --init-from must be the run's folder"
            )

    def check(self, sd: dict[str, torch.Tensor]) -> None:
        from mmkit.models.wan.model import WanTransformer

        with torch.device("meta"):
            want = {k: v.shape for k, v in WanTransformer(self.cfg).state_dict().items()}
        _check_shapes(want, sd, f"Wan DiT checkpoint vs {self.src / 'transformer' / 'config.json'}")

    def write(self, sd, out: Path, dtype, max_shard_bytes: int, progress: bool) -> None:
        from mmkit.models.wan import hf

        if self.layout == "original":
            save_state_dict(hf.to_original(sd), out, DIT_STEM, max_shard_bytes, dtype, progress, "write DiT")
            (out / "config.json").write_text(json.dumps(hf.config_to_original(self.cfg), indent=2) + "\n")
            return
        dit = out / "transformer"
        save_state_dict(hf.to_hf(sd), dit, DIT_STEM, max_shard_bytes, dtype, progress, "write transformer")
        (dit / "config.json").write_text(json.dumps(self.dit_config, indent=2) + "\n")
        for name in tqdm(self.components, desc="copy frozen components", disable=not progress):
            shutil.copytree(self.src / name, out / name)
        shutil.copy2(self.src / "model_index.json", out / "model_index.json")


# ---------------------------------------------------------------------------------------------------
# Qwen2.5-VL
# ---------------------------------------------------------------------------------------------------
class _QwenExport:
    """Qwen2.5-VL checkpoint -> transformers folder (config, shards, tokenizer/processor files)."""

    def __init__(self, info: CheckpointInfo, tokenizer_from: str | os.PathLike | None):
        from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig, flavor
        from mmkit.models.qwen2_5_vl.tiny import tiny_config

        self.src = info.init_from
        if self.src is not None:
            _need_folder(self.src, f"model.init_from of {info.config_file}", "pass --init-from DIR")
            self.cfg = Qwen2_5_VLConfig.from_pretrained(self.src)
            self.hf_config = read_json(self.src / "config.json")
        else:  # a run from a named flavor: the architecture is the flavor's
            self.cfg = tiny_config() if info.flavor == "tiny" else flavor(info.flavor)
            self.hf_config = self.cfg.to_hf_dict()
        self.tok = Path(tokenizer_from) if tokenizer_from is not None else None
        if self.tok is not None:
            _need_folder(
                self.tok, "--tokenizer-from", "pass a folder with tokenizer.json / tokenizer_config.json"
            )
        tok_src = self.tok or self.src
        if tok_src is None:
            raise ValueError(
                f"{info.config_file}: the run started from flavor {info.flavor!r} without model.init_from, so "
                "there are no tokenizer files to copy; pass --tokenizer-from DIR (tokenizer_from=...), a "
                "Qwen2.5-VL folder whose tokenizer matches the model's vocabulary"
            )
        if not any((tok_src / f).is_file() for f in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{tok_src} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}); pass --tokenizer-from DIR"
            )

    def check(self, sd: dict[str, torch.Tensor]) -> None:
        from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel

        with torch.device("meta"):
            want = {k: v.shape for k, v in Qwen2_5_VLModel(self.cfg).state_dict().items()}
        where = f"Qwen2.5-VL checkpoint vs {self.src / 'config.json' if self.src else 'its flavor'}"
        _check_shapes(want, sd, where)

    def write(self, sd, out: Path, dtype, max_shard_bytes: int, progress: bool) -> None:
        from mmkit.models.qwen2_5_vl.hf import to_hf

        save_state_dict(to_hf(sd, self.cfg), out, "model", max_shard_bytes, dtype, progress, "write model")
        config = dict(self.hf_config)
        # transformers 5 loads in the dtype config.json names: make it the one written
        config["dtype"] = _dtype_name(sd, dtype)
        config.pop("torch_dtype", None)
        for src in (self.src, self.tok):  # the tokenizer folder's files win over init_from's
            if src is not None:
                _copy_files(src, out, skip=("config.json",))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not (out / "generation_config.json").is_file():
            gen = {"bos_token_id": self.cfg.bos_token_id, "pad_token_id": self.cfg.pad_token_id}
            gen["eos_token_id"] = self.cfg.eos_token_ids
            (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
