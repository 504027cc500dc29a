"""Damaged files named, never raw: checked opening of safetensors files and per-folder manifests.

A truncated or overwritten `.safetensors` file (an interrupted download, a full disk, a damaged shard)
makes the `safetensors` library raise `SafetensorError: ... MetadataIncompleteBuffer` without the file
name. Everything in mmkit that opens one goes through `load_safetensors` / `open_safetensors` /
`check_safetensors`, which check the header and the size first and raise `DamagedFileError` naming
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

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
_HEADER_LIMIT = 100 * 1024**2  # the safetensors library refuses headers above 100 MB too


class DamagedFileError(ValueError):
    """A file that exists but cannot be what it claims to be (truncated, empty, overwritten, altered)."""

    def __init__(self, path: str | os.PathLike, why: str, fix: str = ""):
        self.path = Path(path)
        super().__init__(f"{self.path}: {why}" + (f"; {fix}" if fix else ""))


_FIX = "the file is damaged (an interrupted download or save?); fetch or copy it again"


def check_safetensors(path: str | os.PathLike, fix: str = _FIX) -> dict:
    """The header of a safetensors file after checking it is complete; DamagedFileError naming it if not.

    Reads only the header (no tensor data): the JSON must parse and the last tensor must end exactly at
    the end of the file, which catches truncation, empty files and most overwritten headers.
    Example: `check_safetensors("model.safetensors")["__metadata__"]`.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DamagedFileError(p, f"{size} bytes, too short for a safetensors header", fix)
            (n,) = struct.unpack("<Q", head)
            if n > min(_HEADER_LIMIT, size - 8):
                raise DamagedFileError(
                    p, f"header length {n} does not fit in the file's {size} bytes (truncated?)", fix
                )
            raw = f.read(n)
    except OSError as e:
        raise DamagedFileError(p, f"cannot be read ({e.strerror or e})", fix) from None
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise DamagedFileError(p, "the safetensors header is not valid JSON tensor metadata", fix) from None
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise DamagedFileError(
            p, f"{size} bytes, but its header describes {expected} (truncated or altered)", fix
        )
    return header


def load_safetensors(path: str | os.PathLike, device: str = "cpu", fix: str = _FIX) -> dict:
    """Every tensor of one safetensors file, `{name: tensor}`; DamagedFileError naming the file if damaged.

    Example: `sd = load_safetensors("transformer/diffusion_pytorch_model.safetensors")`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path, fix)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise DamagedFileError(path, f"cannot be read as safetensors ({e})", fix) from None


@contextlib.contextmanager
def open_safetensors(
    path: str | os.PathLike, framework: str = "pt", device: str = "cpu", fix: str = _FIX
) -> Iterator:
    """`safetensors.safe_open` after `check_safetensors`; errors while opening name the file.

    Example: `with open_safetensors(p) as f: names = list(f.keys())`.
    """
    from safetensors import SafetensorError, safe_open

    check_safetensors(path, fix)
    try:
        handle = safe_open(str(path), framework=framework, device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise DamagedFileError(path, f"cannot be read as safetensors ({e})", fix) from None
    with handle as f:
        yield f


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
