"""Output folders and files a command writes: mmkit never deletes or overwrites what it did not create.

Every folder a command builds (`create-tiny`, `data synth`, `data features`, `demo`, `convert`) carries a marker
file, `.mmkit-output.json`, naming the command. A later run may replace such a folder only when asked
(`--overwrite`); a non-empty folder without the marker (the user's own files, a checkpoint folder) is
never touched. Output files (`generate --out`) are replaced only with `--overwrite`.

Example:
    >>> out = claim_output_dir("outputs/shapes", "data synth shapes")          # new or empty: claimed
    >>> claim_output_dir("outputs/shapes", "data synth shapes", overwrite=True)  # replaced
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = ".mmkit-output.json"


class OutputExistsError(FileExistsError, ValueError):
    """An output path holds something a command may not replace (a ValueError, so the CLI prints it)."""


def written_by(folder: str | os.PathLike) -> str | None:
    """The command whose marker `folder` carries, or None. Example: `written_by("outputs/demo")` -> `"demo"`."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text()).get("command") or "mmkit")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return "mmkit"  # a damaged marker still says mmkit made the folder


def check_output_dir(path: str | os.PathLike, command: str, overwrite: bool = False) -> bool:
    """Raise `OutputExistsError` unless `claim_output_dir` may take `path`; True when it would replace
    an earlier output. Changes nothing: commands call it before any compute.
    Example: `check_output_dir("outputs/feats", "data features", overwrite=False)`.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not a folder; `{command}` needs a new or empty folder.")
    if out.is_dir() and any(out.iterdir()):
        owner = written_by(out)
        if owner is None:
            raise OutputExistsError(
                f"{out} exists, is not empty and was not written by mmkit; it is left untouched. "
                "Choose a new or empty folder."
            )
        if not overwrite:
            raise OutputExistsError(
                f"{out} holds the output of an earlier `mmkit {owner}` run; pass --overwrite to replace it, "
                "or choose a new folder."
            )
        return True
    return False


def claim_output_dir(path: str | os.PathLike, command: str, overwrite: bool = False) -> Path:
    """Make `path` an empty folder marked as `command`'s output; returns it.

    New or empty folder: created and marked. A folder marked by an earlier mmkit command: replaced
    when `overwrite`, otherwise refused. Anything else (a file, a non-empty folder without the marker)
    is refused and left untouched. Refusals raise `OutputExistsError` naming the path and the fix.
    Example: `claim_output_dir("outputs/wan-tiny", "create-tiny wan-t2v", overwrite=args.overwrite)`.
    """
    out = Path(path)
    if check_output_dir(out, command, overwrite):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return mark_output_dir(out, command)


def mark_output_dir(folder: str | os.PathLike, command: str) -> Path:
    """Write the marker naming `command` into `folder` (which exists); returns it.
    Example: `mark_output_dir(tmp, "convert hf-to-mm")` on a folder built under a temporary name.
    """
    folder = Path(folder)
    # no timestamp: the same command writes byte-identical folders
    (folder / MARKER).write_text(json.dumps({"command": command}) + "\n")
    return folder


def check_output_file(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an existing output file unless `overwrite`, and an output folder that cannot be written.

    Called before any compute, so a bad path never costs a finished result. Creates the parent folder.
    Example: `check_output_file("out/t2v.mp4", overwrite=False)`.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputExistsError(f"{flag} {p}: is a folder; give a file name (e.g. {p / 'out.mp4'}).")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{flag} {p}: the file exists; pass --overwrite to replace it.")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {p}: cannot create the folder {p.parent} ({e.strerror}).") from e
    try:  # a real write: permission bits say nothing for root or on a read-only mount
        with tempfile.TemporaryFile(dir=p.parent):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {p}: the folder {p.parent} is not writable ({e.strerror}).") from e
    return p
