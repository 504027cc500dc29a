"""Reading and writing Hugging Face checkpoint files: single or sharded safetensors with an index.

Only safetensors are read: nothing here unpickles a file. A `.bin`/`.pt`/`.pth` checkpoint is
refused with a message that says how to convert it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SAFE_INDEX_SUFFIX = ".safetensors.index.json"


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
        index = json.loads(indexes[0].read_text())
        names = sorted(set(index["weight_map"].values()))
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


def load_state_dict(folder: str | os.PathLike, stem: str | None = None, device: str = "cpu") -> dict:
    """Every tensor of a (possibly sharded) safetensors checkpoint, as one flat dict.

    Example: `sd = load_state_dict("ckpt/transformer")`.
    """
    sd: dict[str, torch.Tensor] = {}
    for f in find_weight_files(folder, stem):
        sd.update(load_file(str(f), device=device))
    return sd


def save_state_dict(
    sd: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    stem: str = "model",
    max_shard_bytes: int = 5 * 1024**3,
) -> list[Path]:
    """Write `sd` as `<stem>.safetensors`, or as shards plus `<stem>.safetensors.index.json`.

    Shard names follow the HF convention `<stem>-00001-of-00003.safetensors`.
    Example: `save_state_dict(sd, "out/transformer", "diffusion_pytorch_model", 2**30)`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(sd):
        t = sd[name].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        path = folder / f"{stem}.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        weight_map.update({k: path.name for k in shard})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}{SAFE_INDEX_SUFFIX}").write_text(json.dumps(index, indent=2))
    return paths


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
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
