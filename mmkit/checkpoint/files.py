"""Damaged files named, never raw: per-folder manifests, and the checked safetensors readers.

A truncated or overwritten `.safetensors` file (an interrupted download, a full disk, a damaged shard)
makes the `safetensors` library raise `SafetensorError: ... MetadataIncompleteBuffer` without the file
name. Everything in mmkit that opens one goes through `load_safetensors` / `open_safetensors` /
`check_safetensors` (defined in `models/common/hf_io.py`, the lowest floor, re-exported here), which check the header and the size first and raise `DamagedFileError` naming
the file, what is wrong and what to do.

A manifest (`manifest.json`: the size and sha256 of every file in a folder) is written into each
training checkpoint before the `latest` pointer names it; `verify_manifest` finds any file since
truncated, emptied, changed or deleted. Checksums cover what a header check cannot (flipped bytes
inside the tensor data).

Example:
    >>> sd = load_safetensors("ckpt/step_4/dcp/shard-00000-model-00001-of-00001.safetensors")
    >>> write_manifest(Path("ckpt/.tmp-step_4"))
    >>> verify_manifest(Path("ckpt/step_4"))                  # [] when intact, else one line per problem
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mmkit.models.common.hf_io import (  # noqa: F401  one implementation, re-exported for checkpoint code
    DamagedFileError,
    check_safetensors,
    load_safetensors,
    open_safetensors,
)

MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write `<folder>/manifest.json`: `{relative path: {"size": bytes, "sha256": hex}}` of every file
    in it (fsynced). Example: `write_manifest("ckpt/.tmp-step_4")`."""
    folder = Path(folder)
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
    }
    out = folder / MANIFEST
    with open(out, "w") as f:
        json.dump({"format": 1, "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return out


def verify_manifest(folder: str | os.PathLike, checksums: bool = True) -> list[str]:
    """Problems of `folder` against its manifest, one line each naming the file ([] = intact).

    A folder without a manifest (written before manifests existed) yields `[]`; a damaged manifest is a
    problem itself. `checksums=False` checks presence and sizes only (fast).
    Example: `bad = verify_manifest("ckpt/step_4")`.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["files"]
        assert isinstance(entries, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return [f"{path}: the manifest is unreadable or damaged"]
    problems = []
    for rel, want in sorted(entries.items()):
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{p}: missing")
            continue
        try:
            if size != want["size"]:
                problems.append(f"{p}: {size} bytes, the manifest says {want['size']}")
            elif checksums and _sha256(p) != want["sha256"]:
                problems.append(f"{p}: its sha256 differs from the manifest (the file was altered)")
        except (OSError, KeyError, TypeError) as e:
            problems.append(f"{p}: cannot be checked ({e})")
    return problems
