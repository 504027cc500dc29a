"""Reading and writing Hugging Face checkpoint files: single or sharded safetensors with an index, the
non-weight side files of a folder, and `HFModel`, what a family's HF adapter reads out of a folder.

Only safetensors are read: nothing here unpickles a file. Every read goes through `check_safetensors`,
so a damaged file is one `DamagedFileError` naming it, never a bare `SafetensorError`. A `.bin`/`.pt`/`.pth` checkpoint is
refused with a message that says how to convert it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

SAFE_INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # the Hugging Face default max_shard_size ("5GB")
# Files that hold weights: never copied as side files (a writer writes its own).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".index.json")


@dataclass
class HFModel:
    """One model read out of a Hugging Face folder by its family's HF adapter (`models/<family>/hf.py`)."""

    cfg: Any  # the mmkit model config
    hf_config: dict  # the HF config.json dict it came from (diffusers transformer / transformers config)
    state: dict[str, torch.Tensor]  # mmkit names, full tensors
    where: str  # the weights folder and its layout, for messages
    source: Path | None  # the HF folder to write it back out from (Wan: the pipeline with the frozen parts)
    hf_files: Path | None = None  # the folder whose side files (tokenizer, processor) travel with it


def find_weight_files(folder: str | os.PathLike, stem: str | None = None) -> list[Path]:
    """The safetensors files of a checkpoint folder, resolved through its `*.index.json` if any.

    `stem` picks one of several checkpoints in a folder (e.g. `"diffusion_pytorch_model"`).
    Example: `find_weight_files("Wan2.1-T2V-1.3B-Diffusers/transformer")`.
    """
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    indexes = sorted(folder.glob(f"*{SAFE_INDEX_SUFFIX}"))
    if stem is not None:
        indexes = [p for p in indexes if p.name.startswith(stem)]
    if indexes:
        index = read_json(indexes[0], "weight index")
        if not isinstance(index.get("weight_map"), dict):
            raise ValueError(f'{indexes[0]}: has no "weight_map" object; the index file is damaged.')
        names = sorted(set(map(str, index["weight_map"].values())))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{indexes[0]} lists shard(s) that are not on disk: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if stem is not None:
        files = [p for p in files if p.name.startswith(stem)]
    if files:
        return files
    pickled = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in folder.glob(ext))
    if pickled:
        raise ValueError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); mmkit never unpickles checkpoints. "
            "Convert them once to safetensors (e.g. transformers' `save_pretrained(safe_serialization=True)`)."
        )
    raise FileNotFoundError(f"no *.safetensors weights in {folder}")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
_DTYPE_BYTES.update({"BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8})


class DamagedFileError(ValueError):
    """A file that exists but cannot be what it claims to be (truncated, empty, overwritten, altered)."""

    def __init__(self, path: str | os.PathLike, why: str, fix: str = ""):
        self.path = Path(path)
        super().__init__(f"{self.path}: {why}" + (f"; {fix}" if fix else ""))


_FIX = "the file is damaged (an interrupted download or save?); fetch or copy it again"
_HEADER_LIMIT = 100 * 1024**2  # the safetensors library refuses headers above 100 MB too


def check_safetensors(path: str | os.PathLike, fix: str = _FIX) -> dict[str, dict]:
    """Read and check a safetensors file's header without loading it: {name: {"dtype", "shape", ...}}.

    A truncated, empty or damaged file (an interrupted download, a broken shard, a save cut short) makes
    the `safetensors` library raise a bare `SafetensorError` without the file name; this raises one
    DamagedFileError (a ValueError) naming the file, what is wrong and `fix`. Checks the header length,
    that it is JSON tensor metadata, that every tensor's byte range fits its dtype and shape, and that
    the last tensor ends exactly at the end of the file. Reads no tensor data.
    Example: `sum(math.prod(t["shape"]) for t in check_safetensors("model.safetensors").values())`.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DamagedFileError(p, f"{size} bytes, too short for a safetensors header", fix)
            n = int.from_bytes(head, "little")
            if n > min(_HEADER_LIMIT, size - 8):
                raise DamagedFileError(
                    p, f"header length {n} does not fit in the file's {size} bytes (truncated?)", fix
                )
            raw = f.read(n)
    except OSError as e:
        raise DamagedFileError(p, f"cannot be read ({e.strerror or e})", fix) from None
    try:
        header = json.loads(raw)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        ranges = [(k, *map(int, v["data_offsets"]), math.prod(v["shape"]) * _DTYPE_BYTES[v["dtype"]])
                  for k, v in tensors.items()]  # fmt: skip
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise DamagedFileError(p, "the safetensors header is not valid JSON tensor metadata", fix) from None
    for name, begin, end, want in ranges:
        if not 0 <= begin <= end or end - begin != want:
            raise DamagedFileError(
                p, f"tensor {name} claims bytes {begin}..{end}, its shape needs {want}", fix
            )
    expected = 8 + n + max((end for _, _, end, _ in ranges), default=0)
    if expected != size:
        raise DamagedFileError(
            p, f"{size} bytes, but its header describes {expected} (truncated or altered)", fix
        )
    return tensors


def load_safetensors(
    path: str | os.PathLike, device: str = "cpu", fix: str = _FIX
) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, `{name: tensor}`, each starting aligned (`own_aligned`);
    DamagedFileError naming the file if damaged.

    Example: `sd = load_safetensors("transformer/diffusion_pytorch_model.safetensors")`.
    """
    check_safetensors(path, fix)
    try:
        sd = load_file(str(path), device=device)
    except Exception as e:  # SafetensorError and friends: damage the header check let through
        raise DamagedFileError(path, f"cannot be read as safetensors ({e})", fix) from None
    return own_aligned(sd)  # every model read through here computes the same numbers wherever it sat


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, framework: str = "pt", device: str = "cpu", fix: str = _FIX):
    """`safetensors.safe_open` after `check_safetensors`; errors while opening name the file.

    Example: `with open_safetensors(p) as f: names = list(f.keys())`.
    """
    from safetensors import safe_open

    check_safetensors(path, fix)
    try:
        handle = safe_open(str(path), framework=framework, device=device)
    except Exception as e:
        raise DamagedFileError(path, f"cannot be read as safetensors ({e})", fix) from None
    with handle as f:
        yield f


ALIGN_BYTES = 64  # what PyTorch's CPU allocator gives a fresh tensor


def own_aligned(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with every tensor that does not start on a 64-byte boundary copied into its own storage.

    Why: safetensors tensors are views into the file at the header's offsets, and MKL's
    matrix-vector kernel (a Linear on one row, e.g. Wan's time embedding) rounds differently for a
    weight 8 bytes off a 16-byte boundary (measured: up to 4e-6 on a 64x384 fp32 GEMV). Weights
    that FSDP2 gathers, or that were copied for any reason, start aligned; without this the same
    model gives other numbers depending on where its tensors sat in the file. Copies one tensor at
    a time (the file is memory-mapped, so peak memory grows by at most the copied tensors).
    Example: `model.load_state_dict(own_aligned(sd), assign=True)`.
    """
    for k, t in sd.items():
        if t.device.type == "cpu" and t.data_ptr() % ALIGN_BYTES:
            sd[k] = t.clone()
    return sd


def load_state_dict(
    folder: str | os.PathLike, stem: str | None = None, device: str = "cpu", progress: bool = False
) -> dict:
    """Every tensor of a (possibly sharded) safetensors checkpoint, as one flat dict.

    Example: `sd = load_state_dict("ckpt/transformer")`.
    """
    sd: dict[str, torch.Tensor] = {}
    files = find_weight_files(folder, stem)
    indexes = sorted(Path(folder).glob(f"{stem or ''}*{SAFE_INDEX_SUFFIX}")) if Path(folder).is_dir() else []
    listed = read_json(indexes[0], "weight index")["weight_map"] if indexes else None
    for f in tqdm(files, desc=f"read {Path(folder).name}", unit="file", disable=not progress):
        part = load_safetensors(f, device=device)
        if listed is not None:  # a damaged header renames tensors: name the file, not just the keys
            want = {k for k, v in listed.items() if v == f.name}
            if set(part) != want:
                odd = sorted(set(part) ^ want)[:3]
                raise ValueError(
                    f"{f}: its tensors differ from those {indexes[0].name} lists for it (e.g. {', '.join(odd)}); "
                    "the file or the index is damaged; download or write it again"
                )
        sd.update(part)
    return sd


def save_state_dict(
    sd: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    stem: str = "model",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> list[Path]:
    """Write `sd` as `<stem>.safetensors`, or as shards plus `<stem>.safetensors.index.json`.

    Shard names follow the HF convention `<stem>-00001-of-00003.safetensors`. `dtype` casts floating
    tensors as they are written (shard sizes count the written bytes); each shard is materialised
    only while it is written. `progress` shows a byte progress bar.
    Example: `save_state_dict(sd, "out/transformer", "diffusion_pytorch_model", 2**30)`.
    """

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nbytes = {k: v.numel() * out_dtype(v).itemsize for k, v in sd.items()}  # bytes as written
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(sd):
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    n = len(shards)
    files = (
        [f"{stem}.safetensors"]
        if n == 1
        else [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    total = sum(nbytes.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc or f"write {stem}", disable=not progress)
    for names, fname in zip(shards, files):
        tensors = {k: sd[k].detach().cpu().to(out_dtype(sd[k])).contiguous() for k in names}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        bar.update(sum(nbytes[k] for k in names))
    bar.close()
    if n > 1:
        weight_map = {k: f for names, f in zip(shards, files) for k in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}{SAFE_INDEX_SUFFIX}").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / f for f in files]


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the non-weight top-level files of `src` (config, tokenizer, chat template, processor configs)
    into `dst` (created), except the names in `skip`; returns the names copied.

    Example: `copy_side_files(Path("Qwen2.5-VL-3B-Instruct"), Path("out"), skip=("config.json",))`.
    """
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if (
            f.is_file()
            and not f.name.startswith(".")
            and f.name not in skip
            and not f.name.endswith(WEIGHT_SUFFIXES)
        ):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def check_keys(expected: Iterable[str], got: Iterable[str], where: str) -> None:
    """Raise one clear error listing missing and unexpected keys (at most 20 of each shown)."""
    expected, got = set(expected), set(got)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if not missing and not unexpected:
        return
    parts = [f"{where}: checkpoint keys do not match the model."]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
            parts.append(f"{len(keys)} {label}: {shown}")
    parts.append("Check that the folder holds this model family and flavor (config.json vs weights).")
    raise ValueError("\n".join(parts))


def read_json(path: str | os.PathLike, what: str = "config") -> dict:
    """Load a JSON file, naming the file in the error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj
