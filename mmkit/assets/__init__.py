"""Small data files shipped inside the package (package data, not code).

`tiny_wan_vae.safetensors`: the tiny Wan2.1 VAE fitted on synthetic shape clips by
`scripts/fit_tiny_vae.py`; `mmkit.models.wan.tiny.fitted_tiny_vae` reads it.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(name: str) -> Path:
    """The path of the shipped asset `name`; a clear error if the install lacks it.

    Example: `asset_path("tiny_wan_vae.safetensors")`.
    """
    path = ASSETS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"mmkit asset {name!r} is missing from {ASSETS_DIR}; reinstall mmkit with its package data "
            f"(pyproject: [tool.setuptools.package-data] mmkit = ['assets/*.safetensors']) or, for "
            f"tiny_wan_vae.safetensors, rerun scripts/fit_tiny_vae.py."
        )
    return path
